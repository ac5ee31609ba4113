"""Conversation templates (LLaVA's) and tokenisation with assistant-only labels.

Templates (``--version``): ``plain`` (stage 1: the image tokens then the caption, no prompt),
``vicuna_v1`` (stage 2 default)::

    {system} USER: {q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>

``llava_llama_2``, ``mistral_instruct``, ``chatml``, ``llama_3`` (as LLaVA / LLaVA-NeXT write
them), and ``chat_template``: the tokenizer's own Jinja chat template (``apply_chat_template``),
rendered turn by turn.

Labels are ``-100`` everywhere except on the assistant answers and the token that closes each
answer (``</s>``, ``<|im_end|>``, ``<|eot_id|>``: what LLaVA trains on). Image positions never
carry a label, wherever their ``<image>`` stands (in an answer too: LLaVA ignores image
positions always). The text is tokenised one segment (prompt part / answer) at a time, so the
label mask is exact by construction rather than recovered from string offsets.

``<image>`` in the text becomes ``num_image_tokens`` copies of the image token id (one count for
all, or one per placeholder when the images differ in size; the model overwrites their
embeddings with the projector output), so sequences carry their full length and left or right
padding is a plain pad.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"

VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's "
                 "questions.")
LLAVA_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand "
                "the visual content that the user provides, and assist the user with a variety "
                "of tasks using natural language.")

_ROLES = {"human": 0, "user": 0, "gpt": 1, "assistant": 1}


@dataclass(frozen=True)
class ConversationTemplate:
    """``bos? first_user(system, q1) assistant(a1) end between user(q2) assistant(a2) end ...``.

    ``end`` is the text closing an answer; None means the tokenizer's eos id (shown as ``</s>``).
    The user parts (untrained) end with the assistant's header, so they are also the generation
    prompt.
    """
    first_user: str
    user: str
    assistant: str = "{msg}"
    end: str | None = None
    between: str = ""
    system: str = ""
    bos: bool = True

    def segments(self, turns: list[str]) -> list[tuple[str | None, bool]]:
        """``(text, trained)`` pieces; text None stands for the eos token."""
        out: list[tuple[str | None, bool]] = []
        for i, msg in enumerate(turns):
            if i % 2 == 0:
                fmt = self.first_user if i == 0 else self.between + self.user
                out.append((fmt.format(system=self.system, msg=msg), False))
            else:
                out.append((self.assistant.format(msg=msg), True))
                out.append((self.end, True))
        return out

    def render(self, turns: list[str], add_generation_prompt: bool = False) -> str:
        """The prompt as text (for display). ``add_generation_prompt`` is implied: a
        conversation ending on a user turn already ends with the assistant's header."""
        return "".join("</s>" if t is None else t for t, _ in self.segments(turns))


TEMPLATES: dict[str, ConversationTemplate | None] = {
    "plain": None,
    "vicuna_v1": ConversationTemplate(first_user="{system} USER: {msg} ASSISTANT:",
                                      user="USER: {msg} ASSISTANT:", assistant=" {msg}",
                                      system=VICUNA_SYSTEM),
    "llava_llama_2": ConversationTemplate(
        first_user="[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{msg} [/INST]",
        user="[INST] {msg} [/INST]", assistant=" {msg} ", between="<s>", system=LLAVA_SYSTEM),
    "mistral_instruct": ConversationTemplate(first_user="[INST] {msg} [/INST]",
                                             user="[INST] {msg} [/INST]", assistant=" {msg} "),
    "chatml": ConversationTemplate(
        first_user="<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{msg}<|im_end|>\n"
                   "<|im_start|>assistant\n",
        user="<|im_start|>user\n{msg}<|im_end|>\n<|im_start|>assistant\n", end="<|im_end|>",
        between="\n", system="Answer the questions.", bos=False),
    "llama_3": ConversationTemplate(
        first_user="<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>"
                   "<|start_header_id|>user<|end_header_id|>\n\n{msg}<|eot_id|>"
                   "<|start_header_id|>assistant<|end_header_id|>\n\n",
        user="<|start_header_id|>user<|end_header_id|>\n\n{msg}<|eot_id|>"
             "<|start_header_id|>assistant<|end_header_id|>\n\n",
        end="<|eot_id|>", system=LLAVA_SYSTEM),
    "chat_template": None,
}
TEMPLATE_NAMES = tuple(TEMPLATES)


def get_template(name: str) -> ConversationTemplate | None:
    """The template called ``name`` (None for ``plain`` and ``chat_template``, which are
    handled by :func:`tokenize_conversation` directly)."""
    if name not in TEMPLATES:
        raise ValueError(f"template (--version) must be one of {list(TEMPLATES)}, got {name!r}")
    return TEMPLATES[name]


def normalise_turns(conversations) -> list[str]:
    """The turns' texts; ``ValueError`` unless they alternate human / gpt from a human turn
    (``from`` one of :data:`_ROLES`: a ``system`` turn or an unknown role is refused)."""
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
        turns.append(str(turn["value"]))
    return turns


def _encode_text(encode, text: str, image_token_id: int, counts) -> tuple[list[int], list[bool]]:
    """``(ids, is_image)`` of ``text``, each ``<image>`` expanded to ``next(counts)`` ids."""
    ids: list[int] = []
    is_image: list[bool] = []
    for j, part in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if j > 0:
            n = next(counts)
            ids += [image_token_id] * n
            is_image += [True] * n
        if part:
            t = encode(part)
            ids += t
            is_image += [False] * len(t)
    return ids, is_image


def _chat_template_segments(tokenizer, turns: list[str]):
    """The tokenizer's chat template rendered after each turn; each turn's segment is what it
    adds (user turns with the generation prompt, so the assistant header is not trained)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("template 'chat_template' needs a tokenizer with a chat_template")
    msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": m}
            for i, m in enumerate(turns)]
    prev = ""
    for i in range(len(msgs)):  # a generator: a caller may stop after the first turns
        text = tokenizer.apply_chat_template(msgs[:i + 1], tokenize=False,
                                             add_generation_prompt=i % 2 == 0)
        if not text.startswith(prev):
            raise ValueError("the tokenizer's chat template does not render a conversation as "
                             "a prefix of its continuation; pick a --version template instead")
        yield text[len(prev):], i % 2 == 1
        prev = text


def _placeholder_counts(num_image_tokens, n_placeholders: int) -> list[int]:
    """``num_image_tokens`` (one int for every ``<image>``, or a list: one per ``<image>`` in
    order of appearance) as a list of ``n_placeholders`` counts."""
    if isinstance(num_image_tokens, (list, tuple)):
        counts = list(num_image_tokens)
        if len(counts) != n_placeholders:
            raise ValueError(f"num_image_tokens lists {len(counts)} count(s) but the "
                             f"conversation has {n_placeholders} {IMAGE_PLACEHOLDER} "
                             f"placeholder(s)")
    else:
        counts = [num_image_tokens] * n_placeholders
    for i, n in enumerate(counts):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"num_image_tokens[{i}] must be a positive int, got {n!r}")
    return counts


def _segments(tokenizer, turns: list[str], template: str, for_generation: bool):
    """The conversation as ``(text, trained)`` segments, in order, lazily (a caller may stop
    early): ``text`` a string (``<image>`` placeholders in it), None for the eos token, or a
    list of token ids (the bos)."""
    tmpl = get_template(template)
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer must have an eos_token")
    if tokenizer.bos_token_id is not None and template != "chat_template" \
            and (tmpl is None or tmpl.bos):
        yield [tokenizer.bos_token_id], False
    if template == "plain":  # <image>s + the first answer, as LLaVA's stage-1 pretraining
        if len(turns) < 2 and not for_generation:
            raise ValueError("the plain template needs a question turn and an answer turn")
        yield IMAGE_PLACEHOLDER * turns[0].count(IMAGE_PLACEHOLDER), False
        if not for_generation:
            yield turns[1], True
            yield None, True
    elif tmpl is None:
        yield from _chat_template_segments(tokenizer, turns)
    else:
        yield from tmpl.segments(turns)


def _pieces(tokenizer, turns: list[str], *, image_token_id: int, counts: list[int],
            template: str, for_generation: bool):
    """:func:`_segments` tokenised: ``(ids, is_image, trained)``."""
    encode = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    count_iter = iter(counts)
    for text, train in _segments(tokenizer, turns, template, for_generation):
        if text is None:
            yield [tokenizer.eos_token_id], [False], train
        elif isinstance(text, list):
            yield text, [False] * len(text), train
        else:
            yield (*_encode_text(encode, text, image_token_id, count_iter), train)


def tokenize_conversation(tokenizer, conversations, *, image_token_id: int, num_image_tokens,
                          template: str = "vicuna_v1", max_length: int | None = None,
                          for_generation: bool = False) -> dict:
    """Token ids and labels of one LLaVA conversation.

    ``num_image_tokens``: the image tokens each ``<image>`` becomes; an int (every
    placeholder alike) or a list with one count per placeholder, in order of appearance
    (images of different sizes; a video's placeholder stands for all its frames).

    Returns ``{"input_ids": list[int], "labels": list[int], "num_images": int}``; image
    positions are never labelled. With ``for_generation=True`` the last gpt turn (if any) is
    dropped and the prompt ends with the assistant's header. ``max_length`` truncates from the
    right; a truncation that would cut into the image tokens raises ``ValueError`` (the dataset
    finds such records when it is built: :func:`truncation_problem`).
    """
    turns = normalise_turns(conversations)
    if for_generation and len(turns) % 2 == 0:
        turns = turns[:-1]
    get_template(template)
    num_images = sum(msg.count(IMAGE_PLACEHOLDER) for msg in turns)
    counts = _placeholder_counts(num_image_tokens, num_images)
    input_ids: list[int] = []
    labels: list[int] = []
    for ids, is_image, train in _pieces(tokenizer, turns, image_token_id=image_token_id,
                                        counts=counts, template=template,
                                        for_generation=for_generation):
        input_ids += ids
        labels += ([IGNORE_INDEX if im else t for t, im in zip(ids, is_image)] if train
                   else [IGNORE_INDEX] * len(ids))
    if max_length is not None and len(input_ids) > max_length:
        kept = input_ids[:max_length].count(image_token_id)
        if kept != input_ids.count(image_token_id):
            raise ValueError(f"max_length={max_length} would truncate the image tokens "
                             f"(sequence of {len(input_ids)} tokens)")
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return {"input_ids": input_ids, "labels": labels, "num_images": num_images}


def truncation_problem(tokenizer, conversations, *, image_token_id: int, num_image_tokens,
                       template: str = "vicuna_v1", max_length: int | None = None,
                       encode=None) -> str | None:
    """Why :func:`tokenize_conversation` with ``max_length`` would give a useless or an invalid
    item, or None: no answer token left (the first trained position at or past
    ``max_length``), or image tokens cut. Raises ``ValueError`` like it for a malformed
    conversation. Tokenises only what decides it: the text before the first answer, and on up
    to the last image token (an answer without ``<image>`` is not tokenised when no image
    follows it), so that it runs on every record when a dataset is built. ``encode`` (``text
    -> ids``) may be a cached tokenizer call."""
    turns = normalise_turns(conversations)
    get_template(template)
    counts = _placeholder_counts(num_image_tokens,
                                 sum(msg.count(IMAGE_PLACEHOLDER) for msg in turns))
    if encode is None:
        encode = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    count_iter = iter(counts)
    images_left, pos, first = sum(counts), 0, None
    limit = math.inf if max_length is None else max_length
    segs = _segments(tokenizer, turns, template, for_generation=False)
    if template != "chat_template":
        segs = list(segs)  # string formatting only; the look-ahead below needs the next one
    for k, (text, train) in enumerate(segs):
        if train and first is None and isinstance(text, str) and IMAGE_PLACEHOLDER not in text \
                and template != "chat_template" and k + 1 < len(segs) and segs[k + 1][1] \
                and (segs[k + 1][0] is None or len(encode(segs[k + 1][0])) > 0):
            # an answer without <image>, then its end (eos or the template's end text, at least
            # one token, trained): the first target is here, whatever the answer's tokens
            first = pos
            if images_left == 0 or first >= limit:
                break
        if text is None:
            ids, is_image = [tokenizer.eos_token_id], [False]
        elif isinstance(text, list):
            ids, is_image = text, [False] * len(text)
        else:
            ids, is_image = _encode_text(encode, text, image_token_id, count_iter)
        if train and first is None:
            first = next((pos + j for j, im in enumerate(is_image) if not im), None)
        images_left -= sum(is_image[:max(0, min(len(ids), limit - pos))])
        pos += len(ids)
        if pos >= limit or (first is not None and images_left == 0):
            break
    if images_left:
        return (f"max_length={max_length} would truncate the image tokens (--model_max_length; "
                f"{images_left} of {sum(counts)} image tokens past it)")
    if first is None and pos < limit:
        return "no answer token: nothing to train on"
    if first is None or first >= limit:
        at = f"at position {first}" if first is not None else f"past position {pos - 1}"
        return (f"max_length={max_length} leaves no answer token (--model_max_length; the "
                f"first is {at}): nothing to train on")
    return None
