"""Tokenizer: a thin typed wrapper over a `tokenizers` tokenizer.json, with eos ids and a chat template.

Files read from a model folder: tokenizer.json (required), tokenizer_config.json (bos/eos tokens,
chat_template), chat_template.jinja, generation_config.json (eos_token_id).
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer


class Tokenizer:
    """encode/decode text; `eos_token_ids` lists every id that ends generation."""

    def __init__(self, tok: _HFTokenizer, eos_token_ids: list[int] | None = None, bos_token_id: int | None = None,
                 chat_template: str | None = None, special: dict[str, Any] | None = None) -> None:
        self._tok = tok
        self.eos_token_ids = list(eos_token_ids or [])
        self.bos_token_id = bos_token_id
        self.chat_template = chat_template
        self.special = dict(special or {})

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def backend(self) -> _HFTokenizer:
        return self._tok

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def save(self, folder: str | Path) -> None:
        """Write tokenizer.json (+ tokenizer_config.json with eos/bos/chat template) into folder."""
        folder = Path(folder)
        self._tok.save(str(folder / "tokenizer.json"))
        cfg: dict[str, Any] = dict(self.special)
        if self.eos_token_ids:
            cfg.setdefault("eos_token", self._tok.id_to_token(self.eos_token_ids[0]))
        if self.bos_token_id is not None:
            cfg.setdefault("bos_token", self._tok.id_to_token(self.bos_token_id))
        if self.chat_template:
            cfg["chat_template"] = self.chat_template
        (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")

    @classmethod
    def from_folder(cls, folder: str | Path) -> Tokenizer:
        """Load from a model folder (moesaic run folder or Hugging Face folder)."""
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.exists():
            raise ValueError(f"no tokenizer.json in {folder}; a model folder needs one to encode text")
        tok = _HFTokenizer.from_file(str(path))
        tcfg = _read_json(folder / "tokenizer_config.json")
        gcfg = _read_json(folder / "generation_config.json")
        special = {k: _token_str(v) for k, v in tcfg.items() if k.endswith("_token") and v is not None}
        eos: list[int] = []
        g_eos = gcfg.get("eos_token_id")
        if g_eos is not None:
            eos = list(g_eos) if isinstance(g_eos, list) else [int(g_eos)]
        elif special.get("eos_token") and tok.token_to_id(special["eos_token"]) is not None:
            eos = [tok.token_to_id(special["eos_token"])]
        bos = tok.token_to_id(special["bos_token"]) if special.get("bos_token") else None
        template = tcfg.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        jinja = folder / "chat_template.jinja"
        if jinja.exists():
            template = jinja.read_text()
        return cls(tok, eos, bos, template if isinstance(template, str) else None, special)

    # ------------------------------------------------------------ chat template
    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, *,
                            tools: list[dict[str, Any]] | None = None, documents: list[dict[str, Any]] | None = None,
                            **kwargs: Any) -> str:
        """Render a conversation with the model's chat template, as transformers does (tokenize=False).

        The template runs in jinja2's immutable sandbox with transformers' helpers (tojson, raise_exception,
        strftime_now, a dunder-free namespace, loop controls, the {% generation %} tag) and sees
        `messages`, `tools`, `documents`, `add_generation_prompt`, the special tokens (bos_token, eos_token,
        ...) and any extra keyword arguments. Template errors become ValueError.
        """
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template (tokenizer_config.json 'chat_template' or "
                             "chat_template.jinja); format the prompt yourself")
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise ValueError("messages must be a list of dicts with a 'role' (and usually 'content')")
        import jinja2

        special = {k: v for k, v in self.special.items() if k in SPECIAL_TOKEN_NAMES and v is not None}
        context = {**special, **_plain(kwargs)}
        try:
            return _compile_chat_template(self.chat_template).render(
                messages=_alias_reasoning(_plain(messages)), tools=_plain(tools), documents=_plain(documents),
                add_generation_prompt=add_generation_prompt, **context)
        except jinja2.TemplateError as e:
            raise ValueError(f"chat template error: {e}") from None

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
                    ) -> list[int]:
        """Token ids of the rendered conversation (special tokens come from the template, none are added)."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, **kwargs),
                           add_special_tokens=False)


def _token_str(v: Any) -> str | None:
    if isinstance(v, dict):  # AddedToken serialised as a dict
        return v.get("content")
    return v if isinstance(v, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


# ------------------------------------------------------------------ chat template rendering
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _plain(value: Any) -> Any:
    """A copy built from plain JSON types only: objects with methods never reach the sandbox."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return f"<{type(value).__name__}>"


def _alias_reasoning(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Reasoning text under any of its names is visible as both `reasoning_content` and `thinking`."""
    out = []
    for m in messages:
        r = next((m[k] for k in _REASONING_FIELDS if m.get(k) is not None), None)
        out.append(m if r is None else {"thinking": r, **m, "reasoning_content": r})
    return out


@functools.lru_cache(maxsize=16)
def _compile_chat_template(template: str):
    try:
        import jinja2
        import jinja2.ext
        import jinja2.nodes
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ImportError("chat templates need jinja2>=3.1.6: pip install 'jinja2>=3.1.6'") from None
    if tuple(int(p) for p in jinja2.__version__.split(".")[:3] if p.isdigit()) < (3, 1, 6):
        raise ImportError(f"chat templates need jinja2>=3.1.6 (older versions have sandbox escapes); "
                          f"found {jinja2.__version__}")

    class GenerationTag(jinja2.ext.Extension):
        """{% generation %}...{% endgeneration %} marks assistant text (for training masks); renders its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class SafeNamespace(jinja2.utils.Namespace):
        """namespace() that refuses underscore-prefixed attributes (no route to CPython internals)."""

        def __init__(*args, **kwargs):  # Jinja's own signature trick: `self` may be a keyword
            self, rest = args[0], args[1:]
            attrs = dict(*rest, **kwargs)
            for name in attrs:
                _check_attr(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            _check_attr(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

    def _check_attr(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set attribute {name!r} on a namespace")

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now, namespace=SafeNamespace,
                       dict=_TemplateDict())
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat template does not parse: {e}") from None


class _TemplateDict:
    """`dict(...)` inside templates, without exposing the dict type itself."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)
