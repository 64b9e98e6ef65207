"""Versioned prompt templates and validation of the structured (JSON) answers.

A template file (``configs/prompts/*.txt``)::

    # comment lines before the first section are ignored
    # version: entity-v2        <- optional explicit version; otherwise the version is a hash of the file
    [system]
    You are ...
    [user]
    Name: {name}
    ...

Placeholders are ``{name}`` for the input fields the template declares; other braces (JSON examples)
are left as they are. The template version is ``sha256(file bytes)[:12]`` unless a ``# version:`` header
is given, so editing a template automatically gives new cache keys.

Answers must be a JSON object ``{"description": str, "type": str, "attributes": {str: str}}``;
```json fences and text around the object are tolerated; anything else is an :class:`AnswerError`.

Numbers in answers are read by one explicit ASCII rule (:func:`ascii_number`, :func:`ascii_numbers`): ``str.isdigit``,
``re``'s ``\\d`` and ``int`` each accept other sets of digits (``²``, ``①``, ``３``, ``٣``), and an answer of such
digits must be a failed answer, never a crash or a silent reading. (JSON numbers are ASCII by the JSON grammar,
which ``json`` enforces.)
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

_SECTION = re.compile(r"^\[(system|user)\]\s*$")
_VERSION = re.compile(r"^#\s*version:\s*(\S+)\s*$", re.IGNORECASE)
_PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")
_FENCE = re.compile(r"```(?:json|JSON)?\s*\n?(.*?)```", re.DOTALL)
_ASCII_DIGITS = re.compile(r"[0-9]+")
MAX_DIGITS = 18  # a number of more significant digits is read as -1: no answer is a number that large


# The answer schema, for servers that constrain decoding with it (see llm_client.response_format_body).
ANSWER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "description": {"type": "string", "minLength": 1, "maxLength": 600},
        "type": {"type": "string", "maxLength": 80},
        "attributes": {"type": "object", "additionalProperties": {"type": "string", "maxLength": 200}},
    },
    "required": ["description", "type", "attributes"],
}


class TemplateError(ValueError):
    pass


class AnswerError(ValueError):
    """An answer that is not valid against the schema; the message says why."""


@dataclass(frozen=True)
class PromptTemplate:
    name: str  # file stem, e.g. "mention_v1"
    path: str
    version: str
    system: str
    user: str
    fields: tuple[str, ...]  # placeholders used

    @property
    def instructions(self) -> str:
        """The unrendered template text (used to catch answers that copy the example)."""
        return f"{self.system}\n{self.user}"

    @classmethod
    def load(cls, path: str | Path) -> "PromptTemplate":
        path = Path(path)
        if not path.is_file():
            raise TemplateError(f"{path}: prompt template not found")
        raw = path.read_bytes()
        text = raw.decode("utf-8")
        version = None
        sections: dict[str, list[str]] = {}
        current: str | None = None
        for lineno, line in enumerate(text.splitlines(), 1):
            m = _SECTION.match(line)
            if m:
                if m.group(1) in sections:
                    raise TemplateError(f"{path}, line {lineno}: section [{m.group(1)}] given twice")
                current = m.group(1)
                sections[current] = []
                continue
            if current is None:
                vm = _VERSION.match(line)
                if vm:
                    version = vm.group(1)
                elif line.strip() and not line.startswith("#"):
                    raise TemplateError(f"{path}, line {lineno}: text before the first [system]/[user] section")
                continue
            sections[current].append(line)
        if "user" not in sections:
            raise TemplateError(f"{path}: no [user] section")
        system = "\n".join(sections.get("system", [])).strip()
        user = "\n".join(sections["user"]).strip()
        fields = tuple(sorted(set(_PLACEHOLDER.findall(system)) | set(_PLACEHOLDER.findall(user))))
        return cls(name=path.stem, path=str(path), version=version or hashlib.sha256(raw).hexdigest()[:12],
                   system=system, user=user, fields=fields)

    def render(self, values: Mapping[str, str]) -> list[dict[str, str]]:
        """Chat messages for one input; every placeholder must have a value."""
        missing = [f for f in self.fields if f not in values]
        if missing:
            raise TemplateError(f"{self.path}: no value for placeholder(s) {missing}")

        def fill(s: str) -> str:
            return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]) if m.group(1) in values else m.group(0), s)

        messages = []
        if self.system:
            messages.append({"role": "system", "content": fill(self.system)})
        messages.append({"role": "user", "content": fill(self.user)})
        return messages


def correction_message(error: str) -> dict[str, str]:
    """The follow-up user turn sent after an invalid answer (the invalid answer is sent back as the assistant turn)."""
    return {"role": "user", "content": (
        f"Your answer was not valid: {error}. Reply again with only one JSON object of the form "
        '{"description": "...", "type": "...", "attributes": {"key": "value"}} and nothing else.')}


# ---------------------------------------------------------------------------------------------
# Answer parsing


def _extract_json_object(text: str) -> Any:
    candidates = [m.group(1) for m in _FENCE.finditer(text)] + [text]
    last_err = "no JSON object found"
    for cand in candidates:
        start = cand.find("{")
        while start != -1:
            try:
                obj, _ = json.JSONDecoder().raw_decode(cand[start:])
                return obj
            except json.JSONDecodeError as exc:
                last_err = f"invalid JSON ({exc.msg} at char {exc.pos})"
            start = cand.find("{", start + 1)
    raise AnswerError(last_err)


def _scalar_str(v: Any) -> str | None:
    if isinstance(v, str):
        return v.strip()
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, float)):
        return str(v)
    return None


def _norm(s: str) -> str:
    return " ".join(s.lower().split()).rstrip(".")


def parse_answer(text: str, instructions: str | None = None) -> dict[str, Any]:
    """Validate an answer; returns ``{"description", "type", "attributes"}`` or raises :class:`AnswerError`.

    Rules: a JSON object; ``description`` a non-empty string; ``type`` a string (may be empty);
    ``attributes`` absent/null or an object whose values are strings or numbers/booleans (converted to
    strings) or lists of those (joined with ", "); other keys are ignored.
    With ``instructions`` (the unrendered template text), a ``description`` or ``type`` of 12+ characters
    copied from it is rejected (small models echo the example), and attributes copied verbatim from it
    (``"attribute name": "value"``) are dropped.
    """
    if not text or not text.strip():
        raise AnswerError("empty answer")
    obj = _extract_json_object(text)
    if not isinstance(obj, dict):
        raise AnswerError(f"JSON is a {type(obj).__name__}, not an object")
    desc = obj.get("description")
    if not isinstance(desc, str) or not desc.strip():
        raise AnswerError("'description' must be a non-empty string")
    typ = obj.get("type", "")
    if typ is None:
        typ = ""
    if not isinstance(typ, str):
        raise AnswerError("'type' must be a string")
    attrs_in = obj.get("attributes") or {}
    if not isinstance(attrs_in, dict):
        raise AnswerError("'attributes' must be an object")
    attrs: dict[str, str] = {}
    for k, v in attrs_in.items():
        s = _scalar_str(v)
        if s is None and isinstance(v, list):
            parts = [_scalar_str(x) for x in v]
            s = ", ".join(p for p in parts if p) if all(p is not None for p in parts) else None
        if s is None:
            raise AnswerError(f"attribute {k!r} must be a string, number or list of those")
        if s and str(k).strip():
            attrs[str(k).strip()] = s
    if instructions:
        norm_instr = _norm(instructions)
        for name, value in (("description", desc), ("type", typ)):
            if len(_norm(value)) >= 12 and _norm(value) in norm_instr:
                raise AnswerError(f"'{name}' copies the instructions instead of answering")
        attrs = {k: v for k, v in attrs.items() if json.dumps({k: v})[1:-1] not in instructions}
    return {"description": desc.strip(), "type": typ.strip(), "attributes": attrs}


def _ascii_int(digits: str) -> int:
    significant = digits.lstrip("0") or "0"
    return int(significant) if len(significant) <= MAX_DIGITS else -1


def ascii_number(token: str) -> int | None:
    """The number ``token`` is (ASCII digits ``0-9`` only, surrounding whitespace allowed), else None."""
    t = token.strip()
    return _ascii_int(t) if _ASCII_DIGITS.fullmatch(t) else None


def ascii_numbers(text: str, limit: int = 64) -> list[int]:
    """The first ``limit`` numbers written in ASCII digits in ``text`` (other characters, other scripts' digits
    included, separate them)."""
    return [_ascii_int(m.group()) for _, m in zip(range(limit), _ASCII_DIGITS.finditer(text))]


def enrichment_text(answer: Mapping[str, Any]) -> str:
    """The single string that is encoded: ``"type: description; key: value; ..."``."""
    head = answer["description"]
    if answer.get("type"):
        head = f"{answer['type']}: {head}"
    parts = [head] + [f"{k}: {v}" for k, v in sorted(answer.get("attributes", {}).items())]
    return "; ".join(parts)
