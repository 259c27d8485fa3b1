"""sft_toolkit: supervised fine-tuning of chat models that trains only on what the assistant says.

Layers, imported in one direction: `cli` → features (`lint`, `show`, `check_data`, ...) → core
(`masks`, `templates`, `probes`, `problems`) → trl / transformers / datasets / jinja2.
"""

__version__ = "0.1.0"
