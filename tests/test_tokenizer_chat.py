"""Chat templates render exactly as transformers renders them, inside jinja2's sandbox."""

from __future__ import annotations

import json

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("jinja2")

from tokenizers import Tokenizer as HFTok  # noqa: E402
from tokenizers import models, pre_tokenizers, trainers  # noqa: E402

from moesaic.tokenizer import Tokenizer  # noqa: E402

SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]

CHATML = (
    "{% set ns = namespace(sys=false) %}{% for m in messages %}{% if m.role == 'system' %}{% set ns.sys = true %}"
    "{% endif %}{% endfor %}{% if not ns.sys %}<|im_start|>system\nYou are helpful.<|im_end|>\n{% endif %}"
    "{% for m in messages %}{% if m.role not in ['system', 'user', 'assistant', 'tool'] %}"
    "{{ raise_exception('bad role ' + m.role) }}{% endif %}"
    "{% if m.role == 'assistant' %}<|im_start|>assistant\n{% generation %}{{ m.content }}{% endgeneration %}"
    "<|im_end|>\n{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA3ISH = (
    "{{ bos_token }}{% if tools %}Tools: {{ tools | tojson(indent=2) }}\n{% endif %}"
    "{% for m in messages %}{% if loop.index0 == 0 and m.role == 'system' %}[SYS] {{ m.content | trim }}\n"
    "{% continue %}{% endif %}[{{ m.role | upper }}] {{ m.content }}{% if m.role == 'assistant' %}{{ eos_token }}"
    "{% endif %}\n{% endfor %}{% if add_generation_prompt %}[ASSISTANT]{% endif %}"
    "{% if thinking_budget is defined %} budget={{ thinking_budget }}{% endif %}")
MESSAGES = [
    {"role": "system", "content": "  Be brief.  "},
    {"role": "user", "content": "What is a mixture of experts? ünïcode"},
    {"role": "assistant", "content": "Several FFNs; a router picks some per token."},
    {"role": "user", "content": "And top-k?"},
]
TOOLS = [{"type": "function", "function": {"name": "route", "parameters": {"k": "int", "ε": 0.1}}}]


def make_folder(path, template, *, as_jinja_file=False, as_list=False):
    tok = HFTok(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    text = [" ".join(m["content"] for m in MESSAGES)] * 20 + ["system user assistant tools route budget"] * 20
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path.mkdir()
    tok.save(str(path / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
           "unk_token": "<unk>", "pad_token": "</s>"}
    if as_jinja_file:
        (path / "chat_template.jinja").write_text(template)
    elif as_list:
        cfg["chat_template"] = [{"name": "default", "template": template}, {"name": "tool_use", "template": "x"}]
    else:
        cfg["chat_template"] = template
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 4]}))
    return path


@pytest.mark.parametrize("template, kwargs", [
    (CHATML, {}), (LLAMA3ISH, {}), (LLAMA3ISH, {"tools": TOOLS, "thinking_budget": 7})])
@pytest.mark.parametrize("gen_prompt", [True, False])
def test_render_matches_transformers(template, kwargs, gen_prompt, tmp_path):
    d = make_folder(tmp_path / "t", template)
    ours = Tokenizer.from_folder(d)
    ref = transformers.AutoTokenizer.from_pretrained(d)
    for msgs in (MESSAGES, MESSAGES[1:2]):
        want = ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen_prompt, **kwargs)
        got = ours.apply_chat_template(msgs, add_generation_prompt=gen_prompt, **kwargs)
        assert got == want
        assert ours.encode_chat(msgs, gen_prompt, **kwargs) == ref.encode(want, add_special_tokens=False)
    assert ours.eos_token_ids == [2, 4] and ours.bos_token_id == ours.token_to_id("<s>")


@pytest.mark.parametrize("where", ["jinja", "list"])
def test_template_sources(where, tmp_path):
    d = make_folder(tmp_path / "t", CHATML, as_jinja_file=where == "jinja", as_list=where == "list")
    text = Tokenizer.from_folder(d).apply_chat_template(MESSAGES[1:2])
    assert text.endswith("<|im_start|>assistant\n") and "You are helpful." in text


def test_template_errors_and_sandbox(tmp_path):
    tok = Tokenizer.from_folder(make_folder(tmp_path / "t", CHATML))
    with pytest.raises(ValueError, match="bad role robot"):
        tok.apply_chat_template([{"role": "robot", "content": "hi"}])
    with pytest.raises(ValueError, match="list of dicts"):
        tok.apply_chat_template([{"content": "no role"}])
    for evil in ("{{ ''.__class__.__mro__[1].__subclasses__() }}",
                 "{% set ns = namespace() %}{% set ns._x = 1 %}{{ ns._x }}",
                 "{{ messages.append(1) }}"):
        tok.chat_template = evil
        with pytest.raises(ValueError, match="chat template error"):
            tok.apply_chat_template(MESSAGES)
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template(MESSAGES)
