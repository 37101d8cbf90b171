"""load_model: every kind of spec, eval mode, and fast, clear failures."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

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


# ---- device and dtype, for every kind of spec ------------------------------------------------

_SPEC_KINDS = ("folder", "dict", "config", "bridge", "zoo")


def _spec(kind: str, gpt2_folder: Path) -> object:
    """A fresh spec of each kind (a fresh bridge, since load_model moves a bridge in place)."""
    if kind == "folder":
        return gpt2_folder
    if kind == "dict":
        return native_config()
    if kind == "config":
        return TransformerBridgeConfig(**native_config())
    if kind == "bridge":
        return rl.load_model(native_config())
    return "zoo:attn-only"


def _placement(model: Any) -> set[tuple[torch.dtype, str]]:
    return {(p.dtype, p.device.type) for p in model.parameters() if p.is_floating_point()}


@pytest.mark.parametrize("kind", _SPEC_KINDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, "float16"])
def test_dtype_is_honoured_by_parameters_and_cfg(
    kind: str, dtype: torch.dtype | str, gpt2_folder: Path
) -> None:
    model = rl.load_model(_spec(kind, gpt2_folder), dtype=dtype, device="cpu")  # type: ignore[arg-type]
    expected = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    assert _placement(model) == {(expected, "cpu")}
    assert model.cfg.dtype == expected
    assert model.cfg.device == "cpu"
    assert not model.training


def test_default_dtype_is_float32_for_a_folder(gpt2_folder: Path) -> None:
    model = rl.load_model(gpt2_folder)
    assert {dtype for dtype, _ in _placement(model)} == {torch.float32}
    assert model.cfg.dtype == torch.float32


def test_a_bridge_without_dtype_keeps_its_own_and_cfg_follows() -> None:
    model = rl.load_model(native_config(), dtype="bfloat16")
    model.cfg.dtype = torch.float32  # a cfg that disagrees with the parameters
    assert rl.load_model(model).cfg.dtype == torch.bfloat16


def _missing_devices() -> list[str]:
    missing = ["cuda:99"]
    if not torch.cuda.is_available():
        missing.append("cuda")
    if not torch.backends.mps.is_available():
        missing.append("mps")
    return missing


@pytest.mark.parametrize("kind", _SPEC_KINDS)
@pytest.mark.parametrize("device", _missing_devices())
def test_a_missing_device_is_refused_at_load_naming_what_there_is(
    kind: str, device: str, gpt2_folder: Path
) -> None:
    with pytest.raises(ModelLoadError, match=rf"device '{device}' is not available.*has cpu"):
        rl.load_model(_spec(kind, gpt2_folder), device=device)  # type: ignore[arg-type]


def test_a_nonsense_device_is_refused() -> None:
    with pytest.raises(ModelLoadError, match="unknown device 'banana'.*has cpu"):
        rl.load_model(native_config(), device="banana")


def test_an_integer_dtype_is_refused() -> None:
    with pytest.raises(ModelLoadError, match="not a floating-point dtype"):
        rl.load_model(native_config(), dtype="int8")


def test_a_hub_revision_that_is_not_cached_is_a_clear_error_offline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(rl.ModelLoadError, match="revision 'step1000' of 'EleutherAI/pythia-160m'"):
        rl.load_model("EleutherAI/pythia-160m", revision="step1000")
    with pytest.raises(rl.ModelLoadError, match="revision must be a non-empty string"):
        rl.load_model("EleutherAI/pythia-160m", revision="")
