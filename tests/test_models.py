"""load_model: every kind of spec, eval mode, and fast, clear failures."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from transformer_lens import TransformerBridgeConfig

import reuse_lens as rl
from reuse_lens.models import ModelLoadError, model_spec
from reuse_lens.zoo import ZooError
from tests.conftest import native_config


def test_local_folder_loads_offline_in_eval_mode(gpt2_folder: Path) -> None:
    model = rl.load_model(gpt2_folder)
    assert not model.training
    assert model.tokenizer is not None
    assert model.cfg.n_layers == 2 and model.cfg.n_heads == 4
    assert model_spec(model) == str(gpt2_folder)


def test_folder_model_matches_the_hf_model(gpt2_folder: Path) -> None:
    from transformers import GPT2LMHeadModel

    reference = GPT2LMHeadModel.from_pretrained(gpt2_folder, attn_implementation="eager").eval()
    model = rl.load_model(gpt2_folder)
    tokens = torch.tensor([[0, 5, 9, 12, 7]])
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), reference(tokens).logits, atol=1e-5, rtol=1e-5)


def test_tokenizer_prepends_bos(hf_model) -> None:
    ids = hf_model.to_tokens(" John went")
    assert int(ids[0, 0]) == hf_model.tokenizer.bos_token_id


def test_config_and_dict_boot_native() -> None:
    from_dict = rl.load_model(native_config())
    from_cfg = rl.load_model(TransformerBridgeConfig(**native_config()))
    assert not from_dict.training and not from_cfg.training
    tokens = torch.randint(0, 50, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(from_dict(tokens), from_cfg(tokens))


def test_bridge_comes_back_as_is_in_eval_mode(native_model) -> None:
    native_model.train()
    same = rl.load_model(native_model)
    assert same is native_model
    assert not same.training


def test_zoo_names_are_resolved_by_the_zoo() -> None:
    with pytest.raises(ZooError, match="no zoo model 'zoo:does-not-exist'"):
        rl.load_model("zoo:does-not-exist")


def test_unreachable_hub_fails_at_once_naming_the_spec() -> None:
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match="'not-a-user/not-a-model'"):
        rl.load_model("not-a-user/not-a-model")
    assert time.perf_counter() - start < 10  # never the hub client's long retry loop


def test_folder_without_config_is_clear(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no config.json"):
        rl.load_model(tmp_path)


def test_bad_spec_type_and_dtype() -> None:
    with pytest.raises(ModelLoadError, match="cannot load a model from 3"):
        rl.load_model(3)  # type: ignore[arg-type]
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        rl.load_model(native_config(), dtype="float13")


def test_bad_native_config_names_it() -> None:
    with pytest.raises(ModelLoadError, match="cannot build a native model"):
        rl.load_model({"d_model": 32})
