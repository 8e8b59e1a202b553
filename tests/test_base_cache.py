"""The quantized base cache: the first build writes it, later builds map it; the same model either way."""

from pathlib import Path

import pytest
import torch

import loraq
from loraq.product.base import build_base
from loraq.product.base_cache import cache_folder
from loraq.quant.frozen import FrozenQuantized
from loraq.quant.schemes import scheme_for


def mapped_from(t: torch.Tensor, path: Path) -> bool:
    """Whether `t`'s data lies in a mapping of the file `path` (/proc/self/maps)."""
    address = t.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6 and Path(fields[5]) == path.resolve():
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if start <= address < end:
                return True
    return False


def quantized_tensors(model) -> list[torch.Tensor]:
    """The codes and constants of every quantized layer (not NF4's one-number offset, read from the metadata)."""
    layers = [m for m in model.modules() if isinstance(m, FrozenQuantized)]
    return [t for m in layers for t in m.quantized_tensors().values() if t.numel() > 1]


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LORAQ_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="needs /proc/self/maps")
@pytest.mark.parametrize("method", ["qlora", "qalora"])
def test_a_cached_base_is_the_built_one_mapped_from_its_file(tiny_model_dir, cache, tokens, method, capsys):
    config = loraq.LoraConfig(r=4, method=method)
    built, _, errors = build_base(str(tiny_model_dir), config)
    first, _, first_errors = build_base(str(tiny_model_dir), config, base_cache="on")
    assert "cached in" in capsys.readouterr().err
    again, tokenizer, again_errors = build_base(str(tiny_model_dir), config, base_cache="on")
    assert "mapped from the cache" in capsys.readouterr().err
    assert errors == first_errors == again_errors and tokenizer.pad_token is not None
    where = cache_folder(tiny_model_dir, scheme_for(config, None), "on", "cpu")
    assert [p.name for p in cache.joinpath("bases").iterdir()] == [where.name]
    file = where / "model.safetensors"
    for model in (first, again):
        assert model.name_or_path == built.name_or_path
        assert torch.equal(logits(model, tokens), logits(built, tokens))
        assert quantized_tensors(model) and all(mapped_from(t, file) for t in quantized_tensors(model))
    assert not any(mapped_from(t, file) for t in quantized_tensors(built))


def test_a_merge_into_a_mapped_base_leaves_the_cache_as_it_was(tiny_model_dir, cache, tokens):
    config = loraq.LoraConfig(r=4, method="qalora")
    model, _, _ = build_base(str(tiny_model_dir), config, base_cache="on")
    fresh = logits(model, tokens)
    loraq.apply(model, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".B"):
                p.normal_(0, 0.1)
    merged = loraq.merge(model)  # writes the INT4 offsets in place: private pages of the mapping
    assert not torch.equal(logits(merged, tokens), fresh)
    again, _, _ = build_base(str(tiny_model_dir), config, base_cache="on")
    assert torch.equal(logits(again, tokens), fresh)


def test_auto_and_off_leave_small_models_out_and_a_changed_source_is_quantized_again(tiny_model_dir, cache, tmp_path):
    config = loraq.LoraConfig(r=4, method="qlora")
    build_base(str(tiny_model_dir), config, base_cache="auto")  # a tiny source: below 1 GiB
    build_base(str(tiny_model_dir), config, base_cache="off")
    assert not cache.joinpath("bases").exists()
    scheme = scheme_for(config, None)
    before = cache_folder(tiny_model_dir, scheme, "on", "cpu")
    weights = next(tiny_model_dir.glob("*.safetensors"))
    stat = weights.stat()
    import os

    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    try:
        assert cache_folder(tiny_model_dir, scheme, "on", "cpu") != before
        assert cache_folder(tiny_model_dir, scheme_for(loraq.LoraConfig(method="qalora"), None), "on", "cpu") != before
    finally:
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_an_unfinished_or_unreadable_cache_is_built_again(tiny_model_dir, cache, tokens, capsys):
    config = loraq.LoraConfig(r=4, method="qlora")
    built, _, _ = build_base(str(tiny_model_dir), config, base_cache="on")
    where = cache_folder(tiny_model_dir, scheme_for(config, None), "on", "cpu")
    (where / "loraq-base.json").write_text("{not json")
    again, _, _ = build_base(str(tiny_model_dir), config, base_cache="on")
    assert "unreadable; quantizing again" in capsys.readouterr().err
    assert torch.equal(logits(again, tokens), logits(built, tokens))
    (where / "loraq-base.json").unlink()
    build_base(str(tiny_model_dir), config, base_cache="on")
    assert (where / "loraq-base.json").is_file()
    weights = where / "model.safetensors"
    damaged = weights.read_bytes()[:-100]
    weights.unlink()  # (a new file: the models above map the old one privately)
    weights.write_bytes(damaged)
    again, _, _ = build_base(str(tiny_model_dir), config, base_cache="on")
    err = capsys.readouterr().err
    assert "damaged" in err and "model.safetensors" in err
    assert torch.equal(logits(again, tokens), logits(built, tokens))
    mapped, _, _ = build_base(str(tiny_model_dir), config, base_cache="on")  # the replaced file, whole again
    assert "mapped from the cache" in capsys.readouterr().err
    assert torch.equal(logits(mapped, tokens), logits(built, tokens))


def test_bad_base_cache_option_is_named():
    with pytest.raises(loraq.LoraqError, match="--base-cache"):
        loraq.TrainConfig(base_cache="sometimes")


def test_a_run_with_the_cache_trains_as_without_and_its_export_maps_the_cache(tiny_model_dir, cache, tmp_path, capsys):
    from test_train import config

    from loraq.product.export import merge_run

    off = loraq.train(config(tmp_path / "off", tiny_model_dir, method="qalora", steps=3), progress=False)
    on = loraq.train(config(tmp_path / "on", tiny_model_dir, method="qalora", steps=3, base_cache="on"), progress=False)
    assert on.train_losses == off.train_losses and on.val_loss_after == off.val_loss_after
    assert "cached in" in capsys.readouterr().err
    merge_run(on.out, tmp_path / "merged", dtype="fp32", prompts=2)
    assert "mapped from the cache" in capsys.readouterr().err


def test_an_unwritable_cache_leaves_the_base_in_memory(tiny_model_dir, tmp_path, monkeypatch, tokens, capsys):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("LORAQ_CACHE", str(blocker))
    config = loraq.LoraConfig(r=4, method="qlora")
    model, _, errors = build_base(str(tiny_model_dir), config, base_cache="on")
    assert "cannot cache the quantized base" in capsys.readouterr().err and errors
    built, _, _ = build_base(str(tiny_model_dir), config)
    assert torch.equal(logits(model, tokens), logits(built, tokens))


def test_a_full_disk_while_writing_leaves_the_base_in_memory_and_no_folder(tiny_model_dir, cache, monkeypatch, capsys):
    from safetensors import SafetensorError

    import loraq.product.base_cache as base_cache

    def full_disk(model, tokenizer, folder):
        (folder / "model.safetensors").write_bytes(b"partial")
        raise SafetensorError("No space left on device (os error 28)")

    monkeypatch.setattr(base_cache, "write_quantized", full_disk)
    model, _, errors = build_base(str(tiny_model_dir), loraq.LoraConfig(r=4, method="qlora"), base_cache="on")
    assert "No space left" in capsys.readouterr().err and errors
    assert not any(cache.joinpath("bases").iterdir())  # the half-written folder removed
