"""Conversation template (LLaVA's ``vicuna_v1``) and tokenisation with answer-only labels.

The prompt of a LLaVA conversation ``[(human, q1), (gpt, a1), (human, q2), (gpt, a2)]`` is::

    {system} USER: {q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>

Labels are ``-100`` everywhere except on the assistant answers and the end-of-sequence token that
closes each answer (what LLaVA trains on). The text is tokenised one segment at a time, so the
label mask is exact by construction rather than recovered from string offsets.

``<image>`` in the text becomes ``num_image_tokens`` copies of the image token id (the model
overwrites their embeddings with the projector output), so sequences carry their full length
and left or right padding is a plain pad.
"""
from __future__ import annotations

from dataclasses import dataclass

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"

VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's "
                 "questions.")

_ROLES = {"human": 0, "user": 0, "gpt": 1, "assistant": 1}


@dataclass(frozen=True)
class ConversationTemplate:
    """A two-role template: ``system + sep + (role: msg sep / role: msg sep2)*``."""
    system: str = VICUNA_SYSTEM
    roles: tuple[str, str] = ("USER", "ASSISTANT")
    sep: str = " "
    sep2: str = "</s>"  # shown in :meth:`render`; the tokenizer's own eos id is used in ids

    def render(self, turns: list[tuple[str, str]], add_generation_prompt: bool = False) -> str:
        """The prompt as text (for display and for generation prompts)."""
        out = self.system + self.sep
        for i, (_, msg) in enumerate(turns):
            out += f"{self.roles[i % 2]}: {msg}" + (self.sep if i % 2 == 0 else self.sep2)
        if add_generation_prompt:
            out += f"{self.roles[1]}:"
        return out


TEMPLATES = {"vicuna_v1": ConversationTemplate(), "plain": None}


def get_template(name: str) -> ConversationTemplate | None:
    """``"vicuna_v1"`` or ``"plain"`` (stage-1 style: image tokens then the caption, no prompt)."""
    if name not in TEMPLATES:
        raise ValueError(f"template must be one of {sorted(TEMPLATES)}, got {name!r}")
    return TEMPLATES[name]


def _normalise_turns(conversations) -> list[tuple[str, str]]:
    if not isinstance(conversations, list) or not conversations:
        raise ValueError(f"conversations must be a non-empty list, got {conversations!r}")
    turns = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise ValueError(f"conversations[{i}] must be a dict with 'from' and 'value', "
                             f"got {turn!r}")
        role = _ROLES.get(str(turn["from"]).lower())
        if role is None:
            raise ValueError(f"conversations[{i}]['from'] must be one of {sorted(_ROLES)}, "
                             f"got {turn['from']!r}")
        if role != i % 2:
            raise ValueError(f"conversations must alternate human/gpt starting with human; "
                             f"turn {i} is from {turn['from']!r}")
        turns.append((turn["from"], str(turn["value"])))
    return turns


def _encode_text(tokenizer, text: str, image_token_id: int, num_image_tokens: int) -> list[int]:
    """Token ids of ``text`` with each ``<image>`` expanded to ``num_image_tokens`` ids."""
    ids: list[int] = []
    parts = text.split(IMAGE_PLACEHOLDER)
    for j, part in enumerate(parts):
        if j > 0:
            ids += [image_token_id] * num_image_tokens
        if part:
            ids += tokenizer(part, add_special_tokens=False)["input_ids"]
    return ids


def tokenize_conversation(tokenizer, conversations, *, image_token_id: int, num_image_tokens: int,
                          template: str = "vicuna_v1", max_length: int | None = None,
                          for_generation: bool = False) -> dict:
    """Token ids and labels of one LLaVA conversation.

    Returns ``{"input_ids": list[int], "labels": list[int], "num_images": int}``. With
    ``for_generation=True`` the last gpt turn (if any) is dropped and the prompt ends with
    ``"ASSISTANT:"``. ``max_length`` truncates from the right; a truncation that would cut into
    the image tokens raises ``ValueError`` (the dataset reports and skips such samples).
    """
    turns = _normalise_turns(conversations)
    if for_generation and len(turns) % 2 == 0:
        turns = turns[:-1]
    tmpl = get_template(template)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("tokenizer must have an eos_token")
    enc = lambda s: _encode_text(tokenizer, s, image_token_id, num_image_tokens)  # noqa: E731
    input_ids, labels = list(bos), [IGNORE_INDEX] * len(bos)

    def add(ids, train):
        input_ids.extend(ids)
        labels.extend(ids if train else [IGNORE_INDEX] * len(ids))

    if tmpl is None:  # "plain": <image> + first answer, as LLaVA's stage-1 pretraining
        if len(turns) < 1:
            raise ValueError("plain template needs at least one turn")
        add(enc(IMAGE_PLACEHOLDER) if IMAGE_PLACEHOLDER in turns[0][1] else [], False)
        if not for_generation:
            add(enc(turns[1][1]) + [eos], True)
    else:
        text = tmpl.system + tmpl.sep
        for i, (_, msg) in enumerate(turns):
            if i % 2 == 0:
                text += f"{tmpl.roles[0]}: {msg}{tmpl.sep}{tmpl.roles[1]}:"
                add(enc(text), False)
                text = ""
            else:
                add(enc(" " + msg) + [eos], True)
    num_images = sum(msg.count(IMAGE_PLACEHOLDER) for _, msg in turns)
    if max_length is not None and len(input_ids) > max_length:
        kept = input_ids[:max_length].count(image_token_id)
        if kept != num_images * num_image_tokens:
            raise ValueError(f"max_length={max_length} would truncate the image tokens "
                             f"(sequence of {len(input_ids)} tokens)")
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return {"input_ids": input_ids, "labels": labels, "num_images": num_images}
