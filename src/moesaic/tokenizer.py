"""Tokenizer: a thin typed wrapper over a `tokenizers` tokenizer.json, with eos ids and a chat template.

Files read from a model folder: tokenizer.json (required), tokenizer_config.json (bos/eos tokens,
chat_template), chat_template.jinja, generation_config.json (eos_token_id).
"""

from __future__ import annotations

import json
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
        jinja = folder / "chat_template.jinja"
        if jinja.exists():
            template = jinja.read_text()
        return cls(tok, eos, bos, template if isinstance(template, str) else None, special)


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
