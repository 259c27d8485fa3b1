"""Per-message training control: which assistant turns of a conversation the model learns from.

Users keep some assistant turns as context without learning from them (a bad example, a greeting, a
refusal, old reasoning, a tool call). The control sits on top of the template's own `{% generation %}`
spans rather than re-deriving turns from the text: the template renders as it always does, each
generation span is assigned to the assistant message it belongs to, and the spans of switched-off
messages are dropped before the token mask is built. That works with any template that has markers.

The assignment rule is checked: the spans between two other messages' texts belong to the assistant
message between them (templates from `add-markers` often write two: content, then tool calls and the
end-of-turn). Where that can't tell (several assistant messages in a row, a message's text that is not
found once and in order), the conversation needs one span per assistant message, in order. When neither
works, or a message's text sits outside the spans it was given, the row is refused with the reason
instead of guessing.

What decides whether an assistant message is trained:
  1. the message's own field, when it has one: `"train": true|false` (or `"weight": 1|0`, the same thing);
  2. otherwise both recipe keys must select it: `train_roles`, `assistant` (default: every assistant
     message), `answers` (assistant messages without tool calls) and/or `tool_calls` (assistant messages
     that carry tool calls, text or not); and `train_turns`, `all` (default) or `last` (only the
     conversation's last assistant message).
Tool results, user, system text are never trained (templates don't mark them): marking one
`train: true` is an error, not silence.
"""

from __future__ import annotations

from dataclasses import dataclass

from .masks import Rendered, TokenMask, assistant_mask
from .probes import text_of
from .problems import InputError

ROLE_CHOICES = ("assistant", "answers", "tool_calls")
TURN_CHOICES = ("all", "last")
CONTROL_KEYS = ("train", "weight")


class MappingError(ValueError):
    """The template's generation spans can't be assigned one per assistant message."""


@dataclass(frozen=True)
class TurnPolicy:
    """The recipe's part of the control (a message's own `train` field overrides it)."""

    roles: tuple[str, ...] = ("assistant",)
    turns: str = "all"

    @property
    def is_default(self) -> bool:
        """Every assistant message trained: the template's mask is used as it is."""
        roles = set(self.roles)
        return self.turns == "all" and ("assistant" in roles or {"answers", "tool_calls"} <= roles)


def policy_from(train_roles, train_turns, source: str = "<recipe>") -> TurnPolicy:
    """Validate the recipe keys `train_roles` / `train_turns` (InputError names the key and the choices)."""
    roles = ["assistant"] if train_roles is None else train_roles
    if isinstance(roles, str):
        roles = [roles]
    if not isinstance(roles, list) or not roles:
        raise InputError(f"{source}: train_roles must be a non-empty list of {', '.join(ROLE_CHOICES)}")
    for role in roles:
        if role in ("user", "system", "tool", "ipython", "developer"):
            raise InputError(
                f"{source}: train_roles: {role!r} can't be trained: templates mark only assistant output "
                f"(tool results are input, never trained); choose from {', '.join(ROLE_CHOICES)}"
            )
        if role not in ROLE_CHOICES:
            raise InputError(f"{source}: train_roles: {role!r} is not one of {', '.join(ROLE_CHOICES)}")
    if train_turns not in TURN_CHOICES:
        raise InputError(f"{source}: train_turns: {train_turns!r} is not one of {', '.join(TURN_CHOICES)}")
    return TurnPolicy(roles=tuple(dict.fromkeys(roles)), turns=train_turns)


def recipe_policy(recipe) -> TurnPolicy:
    return policy_from(recipe.toolkit.train_roles, recipe.toolkit.train_turns, recipe.source)


def flag(message: dict) -> bool | None:
    """The message's own decision (`train`, or `weight` 0/1), None when it has none. Assumes a valid message."""
    train, weight = message.get("train"), message.get("weight")
    if train is not None:
        return bool(train)
    if weight is not None:
        return bool(weight)
    return None


def message_problem(i: int, message: dict) -> str | None:
    """A malformed control field on messages[i] (None when fine)."""
    train, weight = message.get("train"), message.get("weight")
    if train is not None and not isinstance(train, bool):
        return f"messages[{i}].train must be true or false, got {train!r}"
    if weight is not None and (isinstance(weight, bool) or weight not in (0, 1)):
        return f"messages[{i}].weight must be 0 or 1 (per-token weights are not supported), got {weight!r}"
    if train is not None and weight is not None and bool(train) != bool(weight):
        return f"messages[{i}] has train: {str(train).lower()} and weight: {weight}, which disagree; keep one"
    if flag(message) and message.get("role") != "assistant":
        return (
            f"messages[{i}] (role {message.get('role')!r}) is marked to train, but templates train only assistant "
            "output (tool results and prompts are never trained); remove the flag"
        )
    return None


def has_flags(messages: list[dict]) -> bool:
    return any(flag(m) is not None for m in messages)


def strip_control(messages: list[dict]) -> list[dict]:
    """The messages without the control fields, so they can't reach (and change) the rendered text."""
    return [{k: v for k, v in m.items() if k not in CONTROL_KEYS} for m in messages]


def selected(messages: list[dict], policy: TurnPolicy) -> dict[int, bool]:
    """For each assistant message's index: whether it is trained."""
    assistant = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    out = {}
    for i in assistant:
        own = flag(messages[i])
        if own is not None:
            out[i] = own
            continue
        kind = "tool_calls" if messages[i].get("tool_calls") else "answers"
        by_role = "assistant" in policy.roles or kind in policy.roles
        out[i] = by_role and (policy.turns == "all" or i == assistant[-1])
    return out


def needs_control(messages: list[dict], policy: TurnPolicy) -> bool:
    """Whether the template's mask must be changed (or checked) for this conversation."""
    return has_flags(messages) or not all(selected(messages, policy).values())


def assign_spans(messages: list[dict], rendered: Rendered) -> dict[int, list[tuple[int, int]]]:
    """Each assistant message's index -> its generation spans.

    Spans between two other messages' texts belong to the assistant message between them, however many the
    template writes (a converted template often writes one for the content and one for the tool calls and
    end-of-turn). Where that can't tell (several assistant messages in a row, a template that moves a
    message's text), the conversation needs one span per assistant message, in order. Raises MappingError
    when neither works, or an assistant message's text appears in the render but outside its spans.
    """
    assistant = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    spans = sorted(rendered.spans)
    out = _between_other_messages(messages, rendered.text, spans)
    if out is None:
        if len(spans) != len(assistant):
            raise MappingError(
                f"the template writes {len(spans)} generation block(s) for {len(assistant)} assistant "
                "message(s) and they can't be told apart by the messages around them; per-message "
                "training control needs one per assistant message there"
            )
        out = {i: [span] for i, span in zip(assistant, spans)}
    for i, own in out.items():
        content = messages[i].get("content")
        text = content.strip() if isinstance(content, str) else ""
        inside = rendered.text[own[0][0] : own[-1][1]] if own else ""
        if text and text in rendered.text and text not in inside:
            raise MappingError(
                f"messages[{i}]'s text is not inside the generation block it maps to (the template's "
                "blocks are not one per assistant message, in order)"
            )
        if flag(messages[i]) and not any(start < end for start, end in own):
            raise MappingError(f"messages[{i}] is marked to train but the template marks nothing of it")
    return out


def _between_other_messages(messages, text: str, spans) -> dict[int, list[tuple[int, int]]] | None:
    """Spans grouped by the assistant messages between the texts of the other messages (which anchor the
    render), or None when a text isn't found exactly once, in order and outside the spans, or a gap holds
    several assistant messages. Empty spans train nothing and are left out (a block around code that prints
    only for assistants is still entered, empty, on the other messages)."""
    spans = [s for s in spans if s[0] < s[1]]
    anchors, pos = [(-1, 0, 0)], 0
    for j, m in enumerate(messages):
        body = text_of(m.get("content")).strip()
        if m.get("role") == "assistant" or not body:
            continue
        at = text.find(body, pos)
        if at < 0 or text.find(body, at + 1) >= 0 or any(a < at + len(body) and at < b for a, b in spans):
            return None  # not found in order, or not only once, or inside a span: no anchor to trust
        anchors.append((j, at, at + len(body)))
        pos = at + len(body)
    anchors.append((len(messages), len(text), len(text)))
    out, placed = {}, 0
    for (j, _, after), (k, before, _) in zip(anchors, anchors[1:]):
        between = [i for i in range(j + 1, k) if messages[i].get("role") == "assistant"]
        inside = [s for s in spans if after <= s[0] and s[1] <= before]
        placed += len(inside)
        if len(between) == 1:
            out[between[0]] = inside
        elif between or inside:
            # Several assistant messages in a row: nothing tells where one ends (a template may skip an
            # empty one, and its neighbour's second span would look like its own).
            return None
    return out if placed == len(spans) else None


def kept_spans(messages: list[dict], rendered: Rendered, policy: TurnPolicy) -> list[tuple[int, int]]:
    """The generation spans of the assistant messages that are trained (raises MappingError)."""
    chosen = selected(messages, policy)
    return [span for i, own in assign_spans(messages, rendered).items() if chosen[i] for span in own]


def controlled_token_mask(tm: TokenMask, messages: list[dict], policy: TurnPolicy) -> list[int]:
    """A `masks.TokenMask`'s mask with the switched-off turns cleared: a token stays trained if it touches a
    kept span (for display, where only offsets are at hand; training uses `token_mask`)."""
    kept = kept_spans(messages, Rendered(tm.text, tm.spans), policy)
    return [int(bool(m) and any(a < e and s < b for s, e in kept)) for m, (a, b) in zip(tm.mask, tm.offsets)]


def token_mask(encoding, spans: list[tuple[int, int]], length: int) -> list[int]:
    """The assistant mask for a subset of the generation spans, by transformers' own rule on the tokens' offsets.

    transformers has no function that takes a chosen subset of spans, so this applies the rule
    `apply_chat_template(return_assistant_tokens_mask=True)` applies (`masks.assistant_mask`: a token is marked
    when it overlaps a span) to the encoding's offsets; the caller checks that all spans give exactly
    transformers' mask, so the two can't drift apart.
    """
    mask = assistant_mask(encoding.encodings[0].offsets, sorted(spans)) if spans else []
    return [int(bool(m)) for m in mask] if len(mask) == length else [0] * length
