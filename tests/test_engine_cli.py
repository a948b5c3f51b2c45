"""`moesaic generate` on a run folder: stdout carries only the generated text, equal to the engine's."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers
from typer.testing import CliRunner

from moesaic import ModelConfig, build_model
from moesaic.inference import Engine, SamplingParams
from moesaic.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    from moesaic.checkpoint.native import write_model_files

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["hello world, experts route tokens. " * 10],
                            trainers.BpeTrainer(vocab_size=280, special_tokens=["<eos>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = Tokenizer(tok, eos_token_ids=[tok.token_to_id("<eos>")])
    torch.manual_seed(0)
    model = build_model(ModelConfig.preset("tiny", vocab_size=tokenizer.vocab_size, max_seq_len=64)).eval()
    folder = tmp_path_factory.mktemp("run")
    write_model_files(folder, model, tokenizer)
    return folder, model, tokenizer


def _app():
    import typer

    from moesaic.commands.generate import generate

    app = typer.Typer()
    app.command()(generate)
    return app


def test_generate_prints_only_text(run_folder):
    folder, model, tokenizer = run_folder
    want = Engine(model, tokenizer).generate(["hello"], SamplingParams(max_tokens=6, temperature=0))[0].text
    res = CliRunner().invoke(_app(), [str(folder), "--prompt", "hello", "--max-tokens", "6", "--dtype", "float32"])
    assert res.exit_code == 0, res.output
    assert res.stdout == want + "\n"
    assert "tokens/s" in res.stderr
    res = CliRunner().invoke(_app(), [str(folder), "--prompt", "hello", "--max-tokens", "6", "--dtype", "float32",
                                      "--stream"])
    assert res.exit_code == 0 and res.stdout == want + "\n"
    for flag in ("--pack-weights", "--no-pack-weights"):  # blocked copies or not: the same greedy text
        res = CliRunner().invoke(_app(), [str(folder), "--prompt", "hello", "--max-tokens", "6", "--dtype", "float32",
                                          flag])
        assert res.exit_code == 0 and res.stdout == want + "\n", res.output


def test_generate_int8_and_experts_per_token(run_folder):
    folder, _, _ = run_folder
    res = CliRunner().invoke(_app(), [str(folder), "--prompt", "hello", "--max-tokens", "4", "--quantize", "int8",
                                      "--experts-per-token", "1", "--temperature", "0.8", "--seed", "3"])
    assert res.exit_code == 0, res.output
    again = CliRunner().invoke(_app(), [str(folder), "--prompt", "hello", "--max-tokens", "4", "--quantize", "int8",
                                        "--experts-per-token", "1", "--temperature", "0.8", "--seed", "3"])
    assert again.stdout == res.stdout
    w8a8 = CliRunner().invoke(_app(), [str(folder), "--prompt", "hello", "--max-tokens", "4", "--quantize", "w8a8",
                                       "--dtype", "float32"])
    assert w8a8.exit_code == 0 and w8a8.stdout.strip(), w8a8.output
    bad = CliRunner().invoke(_app(), [str(folder), "--prompt", "hello", "--quantize", "int4"])
    assert bad.exit_code != 0 and "int8 or w8a8" in str(bad.exception)


def test_chat_streams_replies_until_empty_line(run_folder):
    import typer

    from moesaic.commands.generate import chat

    folder, model, tokenizer = run_folder
    app = typer.Typer()
    app.command()(chat)
    res = CliRunner().invoke(app, [str(folder), "--max-tokens", "5", "--temperature", "0", "--dtype", "float32"],
                             input="hello\nworld\n\n")
    assert res.exit_code == 0, res.output
    assert res.stdout.count("> ") == 3  # two turns, then the empty line ends the session


def test_chat_template_used_when_present(run_folder):
    from moesaic.commands.generate import _chat_ids

    _, _, tokenizer = run_folder
    plain = _chat_ids(tokenizer, [{"role": "user", "content": "hello"}])
    assert plain == "user: hello\nassistant:"
    templ = Tokenizer(tokenizer.backend, tokenizer.eos_token_ids,
                      chat_template="{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
                                    "{% if add_generation_prompt %}[assistant] {% endif %}")
    ids = _chat_ids(templ, [{"role": "user", "content": "hello"}])
    assert tokenizer.decode(ids) == "[user] hello\n[assistant] "
