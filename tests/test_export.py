"""Export to transformers: the exported model computes lmlab's logits, generates its tokens, and its
tokenizer gives lmlab's ids; other architectures are refused in one line."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from lmlab.checkpoint import FORMAT_VERSION, SECTION
from lmlab.errors import ConfigError
from lmlab.export import export_from_config, export_model
from lmlab.models import GPT, LanguageModel, Llama, RecurrentLM
from lmlab.models.mamba import Mamba
from lmlab.models.mamba2 import Mamba2
from lmlab.tokenizers import BPETokenizer, CharTokenizer, Tokenizer, WordTokenizer
from tests.commands import run_command

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

REPO = Path(__file__).resolve().parents[1]
TEXT = (REPO / "data" / "tinyshakespeare.txt").read_text()[:20_000]
ODD = "First Citizen:\n  Zyzzyva's naïve café — 日本語 🙂\t\r\n\n<|endoftext|> end"


@pytest.fixture(scope="module")
def char() -> CharTokenizer:
    tokenizer = CharTokenizer()
    tokenizer.train(TEXT)
    return tokenizer


MODELS = {
    # GPT with and without biases (missing ones are written as zeros), vocabulary padded to 64 rows
    "gpt": lambda v: GPT(v, d_model=32, n_layer=2, n_head=4, block_size=24, pad_vocab_to=64),
    "gpt-bias": lambda v: GPT(v, d_model=32, n_layer=2, n_head=4, block_size=24, bias=True),
    # Llama with grouped-query attention (4 query heads share 2 key/value heads), tied and untied,
    # and RoPE position interpolation (transformers' linear rope scaling)
    "llama-gqa": lambda v: Llama(v, d_model=32, n_layer=2, n_head=4, n_kv_head=2, block_size=24, pad_vocab_to=64),
    "llama-scaled": lambda v: Llama(
        v, d_model=32, n_layer=2, n_head=4, n_kv_head=1, block_size=12, rope_scaling=2.0, tie_weights=False
    ),
    # Mamba tied with a padded vocabulary, and untied with its own state size, kernel and dt rank
    "mamba": lambda v: Mamba(v, d_model=32, n_layer=2, d_state=8, pad_vocab_to=64),
    "mamba-untied": lambda v: Mamba(
        v, d_model=24, n_layer=2, d_state=4, d_conv=3, expand=3, dt_rank=5, tie_weights=False
    ),
    # Mamba-2 tied with a padded vocabulary, 2 groups of B/C and three full chunks; and untied with its
    # own state size, kernel, expansion, heads, 3 groups, a partial last chunk and a larger epsilon
    "mamba2": lambda v: Mamba2(
        v, d_model=32, n_layer=2, d_state=8, n_head=4, n_groups=2, chunk_size=8, pad_vocab_to=64
    ),
    "mamba2-untied": lambda v: Mamba2(
        v,
        d_model=24,
        n_layer=2,
        d_state=4,
        d_conv=3,
        expand=3,
        n_head=6,
        n_groups=3,
        chunk_size=16,
        norm_eps=1e-2,
        tie_weights=False,
    ),
}
EXPORTED_CLASS = {
    "gpt": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM",
    "mamba": "MambaForCausalLM",
    "mamba2": "Mamba2ForCausalLM",
}
SEQ_LEN = 24  # the inputs' length for models without a context limit (Mamba, Mamba-2)


def random_model(name: str, vocab_size: int) -> LanguageModel:
    """Weights far from their init (biases and norms included), so that every mapped tensor matters."""
    torch.manual_seed(0)
    model = MODELS[name](vocab_size)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.3)
    return model.eval()


def load_exported(out: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(out).eval()


@pytest.mark.parametrize("name", list(MODELS))
def test_exported_logits_equal_lmlab_logits(name, char, tmp_path):
    model = random_model(name, char.vocab_size)
    export_model(model, char, tmp_path / "out")
    exported = load_exported(tmp_path / "out")
    assert type(exported).__name__ == EXPORTED_CLASS[name.split("-")[0]]
    seq_len = model.context_length or SEQ_LEN
    idx = torch.randint(0, char.vocab_size, (3, seq_len), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(idx)[0], exported(idx).logits
    assert theirs.shape == ours.shape == (3, seq_len, char.vocab_size)
    assert torch.allclose(theirs, ours, atol=1e-4, rtol=0)


def lmlab_greedy(model: LanguageModel, prompt: torch.Tensor, n_new: int) -> list[int]:
    """Greedy decoding through lmlab's own KV cache, one token per step."""
    with torch.no_grad():
        state = model.init_state(1, "cpu")
        logits, state = model(prompt, state)
        tokens = []
        for _ in range(n_new):
            tokens.append(int(logits[0, -1].argmax()))
            logits, state = model(torch.tensor([[tokens[-1]]]), state)
    return tokens


@pytest.mark.parametrize("name", ["gpt", "llama-gqa", "mamba", "mamba2"])
def test_greedy_generation_gives_the_same_tokens(name, char, tmp_path):
    """Mamba's and Mamba-2's generation carry their conv and SSM states in both libraries. generate() is
    called as docs/export.md shows, with no attention mask, so a prompt token equal to the config's
    padding id would be masked out: this prompt holds ids 1 and 2 (newline, space), and
    Mamba2Config's default padding id is 1."""
    model = random_model(name, char.vocab_size)
    export_model(model, char, tmp_path / "out")
    exported = load_exported(tmp_path / "out")
    prompt = torch.tensor([char.encode("First Citizen:\n").tolist()])
    n_new = (model.context_length or SEQ_LEN) - prompt.size(1)
    with torch.no_grad():
        generated = exported.generate(prompt, max_new_tokens=n_new, do_sample=False)
    assert generated[0, prompt.size(1) :].tolist() == lmlab_greedy(model, prompt, n_new)


TOKENIZERS = {
    "char": CharTokenizer,
    "bpe": lambda: BPETokenizer(vocab_size=300),
    "word": WordTokenizer,
    "word-closed": lambda: WordTokenizer(min_frequency=1, unk=True),
}


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_exported_tokenizer_gives_lmlab_ids_and_text(name, tmp_path):
    tokenizer: Tokenizer = TOKENIZERS[name]()
    tokenizer.train(TEXT)
    model = GPT(tokenizer.vocab_size, d_model=16, n_layer=1, n_head=2, block_size=8)
    export_model(model, tokenizer, tmp_path / "out")
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert isinstance(loaded, transformers.PreTrainedTokenizerFast)
    for text in (TEXT[5_000:7_000], ODD):
        ids = tokenizer.encode(text).tolist()
        assert loaded(text)["input_ids"] == ids
        if name != "word-closed":  # closed-vocabulary words decode space-separated in transformers
            assert loaded.decode(ids) == tokenizer.decode(ids)
        if not tokenizer.emits_unk:
            assert loaded.decode(ids) == text  # exact round trip through transformers
    if name == "bpe":
        assert loaded.eos_token == "<|endoftext|>"
        assert load_exported(tmp_path / "out").config.eos_token_id == loaded.eos_token_id == 0


def test_other_architectures_are_refused_in_one_line(char, tmp_path):
    model = RecurrentLM(char.vocab_size, cell="lstm", d_model=16, n_layer=1)
    with pytest.raises(ConfigError) as error:
        export_model(model, char, tmp_path / "out")
    message = str(error.value)
    assert "\n" not in message and "RecurrentLM" in message
    assert "gpt (as GPT2LMHeadModel)" in message and "llama (as LlamaForCausalLM)" in message
    assert "mamba (as MambaForCausalLM)" in message and "mamba2 (as Mamba2ForCausalLM)" in message
    assert not (tmp_path / "out").exists()


def test_an_existing_folder_is_not_overwritten(char, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already exists"):
        export_model(random_model("gpt", char.vocab_size), char, tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["notes.txt"]


def write_checkpoint(path: Path, model: LanguageModel, model_config: dict, tokenizer: Tokenizer) -> Path:
    """A checkpoint as train.py writes it: Lightning's state dict and the "lmlab" section."""
    torch.save(
        {
            "state_dict": {f"model.{key}": value for key, value in model.state_dict().items()},
            SECTION: {
                "format_version": FORMAT_VERSION,
                "model": {**model_config, "vocab_size": tokenizer.vocab_size},
                "tokenizer": tokenizer.to_json(),
                "config": {
                    "names": {"model": model_config["_target_"].rsplit(".", 1)[-1], "tokenizer": tokenizer.name},
                    "data": {"block_size": 24, "batch_size": 2, "stateful": False},
                },
                "step": 7,
            },
        },
        path,
    )
    return path


def test_export_from_a_checkpoint(char, tmp_path, capsys):
    settings = {"d_model": 32, "n_layer": 2, "n_head": 4, "block_size": 24, "pad_vocab_to": 64}
    model = random_model("gpt", char.vocab_size)
    ckpt = write_checkpoint(tmp_path / "last.ckpt", model, {"_target_": "lmlab.models.GPT", **settings}, char)
    export_from_config(OmegaConf.create({"ckpt": str(ckpt), "out": str(tmp_path / "hf")}))
    assert "GPT2LMHeadModel" in capsys.readouterr().out
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (tmp_path / "hf").iterdir()}
    idx = torch.randint(0, char.vocab_size, (2, 24))
    with torch.no_grad():
        assert torch.allclose(load_exported(tmp_path / "hf")(idx).logits, model(idx)[0], atol=1e-4, rtol=0)


def test_export_py_ends_in_one_error_line_for_a_recurrent_model(char, tmp_path):
    model = RecurrentLM(char.vocab_size, cell="gru", d_model=16, n_layer=1)
    config = {"_target_": "lmlab.models.RecurrentLM", "cell": "gru", "d_model": 16, "n_layer": 1}
    ckpt = write_checkpoint(tmp_path / "last.ckpt", model, config, char)
    result = run_command(
        [sys.executable, str(REPO / "export.py"), f"ckpt={ckpt}", f"out={tmp_path / 'hf'}"],
        timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: a RecurrentLM model cannot be exported")
    assert len(result.stderr.strip().splitlines()) == 1
