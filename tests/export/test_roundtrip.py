"""Export -> load gives the fake-quant student's logits, for every preset."""

import torch
import torch.nn.functional as F
from export_helpers import CLASSNAMES, export_head

from p4q_lightning.export import export_lowbit, load_lowbit, read_container
from p4q_lightning.quant import QuantSpec, quant_spec_of


def _logits(student, text, images, scale=100.0):
    with torch.no_grad():
        return scale * F.normalize(student.encode_image(images), dim=-1) @ text.t()


def test_export_load_logits_equal(student, images, tmp_path, tiny_name) -> None:
    preset, model, text = student
    ctx = torch.randn(4, 64)
    report = export_lowbit(
        tmp_path / "m.safetensors",
        model,
        model_name=tiny_name,
        classnames=CLASSNAMES,
        text_features=text,
        logit_scale=100.0,
        prompt_ctx=ctx,
        extra={"shots": 4},
    )
    loaded = load_lowbit(report.path)
    ref = _logits(model, text, images)
    out = loaded.logits(images)
    assert torch.equal(out.argmax(1), ref.argmax(1))
    assert ((out - ref).abs().max() / ref.abs().max()) <= 1e-4
    assert loaded.classnames == CLASSNAMES
    assert loaded.predict_names(images[:2])[0] in CLASSNAMES
    assert torch.equal(loaded.prompt_ctx, ctx)
    assert loaded.spec.to_dict() == quant_spec_of(model).to_dict()
    assert loaded.info["extra"] == {"shots": 4}
    assert set(loaded.info["versions"]) >= {"torch", "open_clip_torch", "p4q_lightning"}
    # text tower too
    tokens = loaded.tokenizer(["a photo of a cat."])
    with torch.no_grad():
        assert torch.equal(loaded.encode_text(tokens), model.encode_text(tokens))


def test_stored_as_real_integers(student, tmp_path, tiny_name) -> None:
    preset, model, text = student
    report = export_lowbit(tmp_path / "m.safetensors", model, model_name=tiny_name)
    tensors, info = read_container(report.path)
    spec = QuantSpec.from_dict(info["spec"])
    quantized = info["quantized"]
    assert quantized, "no weight was stored as integers"
    for key, q in quantized.items():
        t = tensors[key]
        if q["bits"] <= 4:
            assert t.dtype == torch.uint8 and t.numel() == (torch.Size(q["shape"]).numel() + 1) // 2
        else:
            assert t.dtype == torch.int8 and list(t.shape) == q["shape"]
    emb = "student.token_embedding.weight"
    if spec["text.token_embedding"].w_bits:
        assert emb in quantized
        assert (
            tensors["student.token_embedding.weight_quantizer.scale"].shape[0] == 49408
        )  # one scale per row
    else:
        assert tensors[emb].dtype == torch.float32
    # float parts stay float
    for key in (
        "student.visual.ln_pre.weight",
        "student.positional_embedding",
        "student.visual.proj",
    ):
        assert tensors[key].dtype == torch.float32


def test_adapter_round_trip(student, images, tmp_path, tiny_name) -> None:
    preset, model, text = student
    from p4q_lightning.quant import GroupSpec, QuantLinear

    adapter = QuantLinear(
        32, 32, GroupSpec(w_bits=4, a_bits=8, a_observer="minmax"), "adapter", dynamic_weights=True
    )
    torch.nn.init.normal_(adapter.weight, std=0.1)
    adapter.input_quantizer.set_range(torch.tensor([-1.0]), torch.tensor([1.0]))
    cfg = {"kind": "single_linear", "init": {"dim": 32}}

    def factory(init):
        return QuantLinear(
            init["dim"], init["dim"], GroupSpec(w_bits=4, a_bits=8), "adapter", dynamic_weights=True
        )

    report = export_lowbit(
        tmp_path / "a.safetensors",
        model,
        model_name=tiny_name,
        classnames=CLASSNAMES,
        text_features=text,
        logit_scale=100.0,
        adapter=adapter,
        adapter_config=cfg,
    )
    loaded = load_lowbit(report.path, adapter_factory=factory)
    with torch.no_grad():
        ref = 100 * F.normalize(adapter(model.encode_image(images)), dim=-1) @ text.t()
    out = loaded.logits(images)
    assert ((out - ref).abs().max() / ref.abs().max()) <= 1e-4
    assert torch.equal(out.argmax(1), ref.argmax(1))


def _format_2_layout(name: str) -> str:
    """``name`` as format 1-2 files spelt it: attention's q/k/v projection was not a leaf.

    A file is data, so an old one is built from a new one by renaming its keys (and the names
    in its metadata) back; ``attn.in_proj.X`` was ``attn.in_proj_X`` for the weight and bias
    and plain ``attn.X`` for the quantizers.
    """
    head, sep, local = name.partition(".attn.in_proj.")
    if not sep:
        return name
    if local in ("weight", "bias"):
        return f"{head}.attn.in_proj_{local}"
    return f"{head}.attn.{local}"


def test_format_2_file_loads(student, images, tmp_path, tiny_name) -> None:
    from p4q_lightning.export import write_container

    preset, model, text = student
    path = export_head(tmp_path / "new.safetensors", model, tiny_name, text)
    tensors, info = read_container(path)
    assert info["format_version"] == 3
    assert any(k.endswith(".attn.in_proj.weight") for k in info["quantized"])
    old_tensors = {_format_2_layout(k): t for k, t in tensors.items()}
    assert any(k.endswith(".attn.in_proj_weight") for k in old_tensors)
    assert any(k.endswith(".attn.weight_quantizer.scale") for k in old_tensors)
    assert not any(".attn.in_proj." in k for k in old_tensors)
    old_info = dict(info, format_version=2)
    for table in ("quantized", "zeros"):
        old_info[table] = {_format_2_layout(k): v for k, v in info[table].items()}
    del old_info["format"]
    write_container(tmp_path / "old.safetensors", old_tensors, old_info)
    assert read_container(tmp_path / "old.safetensors")[1]["format_version"] == 2
    new, old = load_lowbit(path), load_lowbit(tmp_path / "old.safetensors")
    assert torch.equal(old.logits(images), new.logits(images))
    for key, value in new.state_dict().items():
        assert torch.equal(old.state_dict()[key], value), key
