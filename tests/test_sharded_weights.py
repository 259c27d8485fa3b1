"""Sharded weights around training: the two places where an H200 run (benchmarks/gpu_suite.sh) found the toolkit
relying on whole weights. The pre-training packing probe runs where some ranks hold no real weights, and the final
save runs under an FSDP sharded state dict, for which transformers' `save_model` writes no model at all.

FSDP and ZeRO-3 themselves need a GPU (accelerate applies FSDP only on accelerator devices); these tests pin the
toolkit's side on CPU: the same plugin object transformers reads, and two gloo ranks of which one holds meta tensors.
"""

from __future__ import annotations

import inspect
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from sft_toolkit.assets import build_quickstart_assets
from sft_toolkit.train import shared_maximum, whole_final_save, zero3_checkpoint_note


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_quickstart_assets(tmp_path_factory.mktemp("assets"))


def fsdp_trainer(state_dict_type: str):
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, state_dict_type=state_dict_type)
    return SimpleNamespace(
        is_fsdp_enabled=True,
        accelerator=SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin)),
        is_world_process_zero=lambda: True,
    )


def writes_weights(trainer) -> bool:
    """transformers' own condition in `Trainer.save_model` for writing weights under FSDP."""
    return "FULL_STATE_DICT" in str(trainer.accelerator.state.fsdp_plugin.state_dict_type)


def test_transformers_save_model_writes_fsdp_weights_only_for_a_full_state_dict():
    from transformers import Trainer

    source = inspect.getsource(Trainer.save_model)
    # The condition `writes_weights` mirrors; if transformers changes it, whole_final_save must be read again.
    assert '"FULL_STATE_DICT" in str(self.accelerator.state.fsdp_plugin.state_dict_type)' in source
    assert not writes_weights(fsdp_trainer("SHARDED_STATE_DICT"))


def test_final_save_under_a_sharded_state_dict_writes_the_whole_model_and_says_so():
    trainer, said = fsdp_trainer("SHARDED_STATE_DICT"), []
    whole_final_save(trainer, said.append)
    assert writes_weights(trainer)
    assert len(said) == 1 and "full" in said[0] and "from_pretrained" in said[0]


def test_final_save_leaves_a_full_state_dict_and_non_fsdp_runs_alone():
    trainer, said = fsdp_trainer("FULL_STATE_DICT"), []
    whole_final_save(trainer, said.append)
    assert writes_weights(trainer) and said == []
    plain = SimpleNamespace(is_fsdp_enabled=False)
    whole_final_save(plain, said.append)
    assert said == [] and vars(plain) == {"is_fsdp_enabled": False}


def test_shared_maximum_on_one_process_and_when_nothing_was_measured():
    assert shared_maximum(0.25) == 0.25
    with pytest.raises(RuntimeError, match="meta device on every rank"):
        shared_maximum(None)


PROBE_RANK = textwrap.dedent(
    """
    import json, os, sys
    import torch.distributed as dist
    from datasets import Dataset
    from sft_toolkit.recipe import build_recipe
    from sft_toolkit.preprocess import load_tokenizer_for
    from sft_toolkit.train import guarded_trainer_class, packing_isolation, prepared_trainer_args

    rank, port, keys, meta_ranks = int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    recipe = build_recipe(keys)
    dataset = Dataset.from_dict({"input_ids": [[1, 2, 3]], "labels": [[1, 2, 3]], "seq_lengths": [[3]]})
    trainer = guarded_trainer_class()(
        model=keys["model_name_or_path"],
        args=prepared_trainer_args(recipe),
        train_dataset=dataset,
        processing_class=load_tokenizer_for(recipe),
    )
    if rank in meta_ranks:  # as FSDP's cpu_ram_efficient_loading leaves the ranks after the first
        trainer.model.to("meta")
    try:
        print(json.dumps({"rank": rank, "difference": packing_isolation(trainer, use_cache=True)}))
    except RuntimeError as err:
        print(json.dumps({"rank": rank, "error": str(err)}))
    dist.destroy_process_group()
    """
)


def two_ranks(assets, tmp_path, meta_ranks: list[int]) -> list[dict]:
    keys = {
        "model_name_or_path": str(assets["model"]),
        "dataset_name": str(assets["train"]),
        "chat_template_path": "chatml",
        "assistant_only_loss": True,
        "max_length": 128,
        "packing": True,
        "use_cpu": True,
        "output_dir": str(tmp_path / "out"),
        "report_to": "none",
    }
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "probe_rank.py"
    script.write_text(PROBE_RANK)
    root = str(Path(__file__).resolve().parents[1])
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(rank), str(port), json.dumps(keys), json.dumps(meta_ranks)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": root, "TOKENIZERS_PARALLELISM": "false"},
        )
        for rank in (0, 1)
    ]
    outputs = [proc.communicate(timeout=120) for proc in procs]
    results = []
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def test_a_rank_holding_meta_weights_takes_the_probe_result_of_the_rank_that_measured(assets, tmp_path):
    # Rank 1's weights are on the meta device: it cannot run the forward (the probe used to fail there) and
    # takes rank 0's figure. With a cache the probe sees the leak, so the figure is non-zero, and both ranks
    # decide on the same number.
    results = two_ranks(assets, tmp_path, meta_ranks=[1])
    assert all("difference" in result for result in results), results
    assert results[0]["difference"] > 0
    assert results[1]["difference"] == results[0]["difference"]


def deepspeed_trainer(**plugin_options):
    from accelerate.utils import DeepSpeedPlugin

    plugin = DeepSpeedPlugin(**plugin_options)
    return SimpleNamespace(accelerator=SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin)))


def test_zero3_without_gathered_weights_is_named_before_training_with_the_setting_that_fixes_it():
    from accelerate import Accelerator

    # accelerate's own condition for refusing the whole state dict, which makes transformers save a checkpoint
    assert "model.zero_gather_16bit_weights_on_model_save()" in inspect.getsource(Accelerator.get_state_dict)
    for unset in ({"zero3_save_16bit_model": False}, {}):
        note = zero3_checkpoint_note(deepspeed_trainer(zero_stage=3, **unset))
        assert "zero3_save_16bit_model: true" in note and "zero_to_fp32.py" in note and "from_pretrained" in note


def test_zero3_gathering_its_weights_lower_stages_and_no_deepspeed_get_no_note():
    assert zero3_checkpoint_note(deepspeed_trainer(zero_stage=3, zero3_save_16bit_model=True)) is None
    assert zero3_checkpoint_note(deepspeed_trainer(zero_stage=2)) is None
    assert zero3_checkpoint_note(SimpleNamespace(accelerator=SimpleNamespace(state=SimpleNamespace()))) is None
