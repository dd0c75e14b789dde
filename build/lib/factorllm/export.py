"""Export a factorized model to formats that stock tools load with no custom code.

One explicit weight-name map per format:
- `mixtral`:   a MixtralForCausalLM folder, per-expert checkpoint names (what vLLM and llama.cpp converters read);
- `qwen2_moe`: a Qwen2MoeForCausalLM folder (shared expert, `softmax` gating, dense layers via mlp_only_layers);
- `gguf`:      one GGUF file in llama.cpp's MoE layout (arch `llama`, stacked `ffn_*_exps` tensors).
A model a format cannot express exactly is refused with the reason and the setting that would work; constant
scales are folded into the expert weights (hard gating at k = 1; Qwen2-MoE's sigmoid(0) = 1/2 shared gate).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from factorllm.moe import MoEFeedForward
from factorllm.registry import Registry

LLAMA_LIKE = ("llama", "mistral")


@dataclass(frozen=True)
class Exporter:
    check: Callable[[nn.Module], None]  # raises ValueError naming the fix
    write: Callable[[nn.Module, Path, object], None]  # (model, temporary target, tokenizer)
    is_file: bool = False


EXPORTERS: Registry[Exporter] = Registry("export format")


def export(model: nn.Module, path: str | os.PathLike, format: str, tokenizer=None, *, overwrite: bool = False,
           **options) -> Path:
    """Writes `model` in `format` to `path` (a folder, or a .gguf file), atomically.

    Example:
        >>> factorllm.export(model, "out/smollm2-mixtral", format="mixtral", tokenizer=tok)
        >>> AutoModelForCausalLM.from_pretrained("out/smollm2-mixtral")  # stock transformers
    """
    exporter = EXPORTERS.get(format)
    exporter.check(model)  # before anything is written
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; choose another path or pass overwrite=True (--overwrite)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        target = tmp / path.name if exporter.is_file else tmp
        exporter.write(model, target, tokenizer, **options)
        if path.exists():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        os.replace(target, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


# ---------------------------------------------------------------------------------------------------------------
# What the formats can express

def _blocks(model: nn.Module) -> list[tuple[int, nn.Module]]:
    from factorllm.adapters import decoder_layers

    _, layers = decoder_layers(model)
    return [(i, layer.mlp) for i, layer in enumerate(layers)]


def _refuse(fmt: str, why: str, fix: str) -> None:
    raise ValueError(f"cannot export to {fmt}: {why}; {fix}")


def _expert_scale(fmt: str, block: MoEFeedForward, gatings: tuple[str, ...]) -> float:
    """The constant folded into the experts' output projection so the target's gating reproduces ours."""
    gating, k = block.router.gating, block.router.top_k
    if gating in gatings:
        return 1.0
    if gating in ("hard", "sum") and k == 1:
        # target weight 1 (one expert, renormalised); hard's E/k is folded into the experts
        return float(block.num_experts) if gating == "hard" else 1.0
    _refuse(fmt, f"{gating!r} gating with top_k={k} has no equivalent there",
            f"convert with gating={gatings[0]!r}" + (f" (or {gating} gating with top_k=1)" if gating in ("hard", "sum")
                                                       else ""))


def _check_common(fmt: str, model: nn.Module, families: tuple[str, ...], gatings: tuple[str, ...],
                  shared_ok: bool) -> None:
    cfg = model.config
    if cfg.model_type not in families:
        _refuse(fmt, f"its attention and norms are those of {cfg.model_type!r}, not of {families}",
                "export a Llama/Mistral-family model, or use 'qwen2_moe' for Qwen2" if fmt != "qwen2_moe" else
                "export a Llama, Mistral or Qwen2 model")
    if getattr(cfg, "mlp_bias", False):
        _refuse(fmt, "the FFNs have biases, which its experts lack", "export a model without mlp_bias")
    if fmt != "qwen2_moe" and getattr(cfg, "attention_bias", False):
        _refuse(fmt, "attention projections have biases", "use format 'qwen2_moe'")
    blocks = _blocks(model)
    if not any(isinstance(b, MoEFeedForward) for _, b in blocks):
        _refuse(fmt, "the model is not factorized", "call factorllm.convert_ first")
    for i, block in blocks:
        if not isinstance(block, MoEFeedForward):
            if fmt != "qwen2_moe":
                _refuse(fmt, f"layer {i} is dense", "factorize every layer, or use format 'qwen2_moe'")
            continue
        if block.experts.padded:
            _refuse(fmt, f"layer {i} has unequal experts {block.experts.sizes}", "convert with equal expert sizes")
        if block.shared is not None and not shared_ok:
            _refuse(fmt, f"layer {i} has a shared expert", "use format 'qwen2_moe', or convert with shared_neurons=0")
        if block.router.gating == "oracle":
            _refuse(fmt, "the oracle gating is an analysis tool with no router to export", "pick a real gating")
        net = block.router.net
        if not isinstance(net, nn.Linear):
            _refuse(fmt, "its routers are single linear layers", "convert with router='linear_nobias'")
        if net.bias is not None and net.bias.detach().abs().max() > 0:
            _refuse(fmt, f"layer {i}'s router has a non-zero bias, which its routers lack",
                    "convert (and train) with router='linear_nobias'")
        _expert_scale(fmt, block, gatings)


def _base_weights(model: nn.Module, skip_ffn: bool = True) -> dict[str, torch.Tensor]:
    """Every non-FFN weight under its (shared Llama/Mixtral/Qwen2) name; the LM head only when untied."""
    tied = getattr(model.config, "tie_word_embeddings", False)
    out = {}
    for name, t in model.state_dict().items():
        if skip_ffn and ".mlp." in name:
            continue
        if name == "lm_head.weight" and tied:
            continue
        out[name] = t.detach().contiguous()
    return out


_CONFIG_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_parameters",
                "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "sliding_window")


def _config_kwargs(model: nn.Module) -> dict:
    src = model.config.to_dict()
    return {k: src[k] for k in _CONFIG_KEYS if k in src}


def _save_folder(model: nn.Module, target: Path, config, tensors: dict[str, torch.Tensor], tokenizer) -> None:
    from safetensors.torch import save_file

    target.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(target)
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(target / "model.safetensors"),
              metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(target)


# ---------------------------------------------------------------------------------------------------------------
# mixtral

def _check_mixtral(model: nn.Module) -> None:
    _check_common("mixtral", model, LLAMA_LIKE, ("softmax_renorm",), shared_ok=False)


def _write_mixtral(model: nn.Module, target: Path, tokenizer) -> None:
    from transformers import MixtralConfig

    blocks = _blocks(model)
    first = blocks[0][1]
    config = MixtralConfig(**_config_kwargs(model), intermediate_size=first.experts.width,
                           num_local_experts=first.num_experts, num_experts_per_tok=first.router.top_k,
                           architectures=["MixtralForCausalLM"])
    tensors = _base_weights(model)
    for i, block in blocks:
        scale = _expert_scale("mixtral", block, ("softmax_renorm",))
        prefix, I = f"model.layers.{i}.block_sparse_moe", block.experts.width
        tensors[f"{prefix}.gate.weight"] = block.router.net.weight
        for e in range(block.num_experts):
            tensors[f"{prefix}.experts.{e}.w1.weight"] = block.experts.w_in[e, :I]  # gate
            tensors[f"{prefix}.experts.{e}.w3.weight"] = block.experts.w_in[e, I:]  # up
            tensors[f"{prefix}.experts.{e}.w2.weight"] = block.experts.w_out[e] * scale  # down
    _save_folder(model, target, config, tensors, tokenizer)


EXPORTERS.register("mixtral")(Exporter(_check_mixtral, _write_mixtral))


# ---------------------------------------------------------------------------------------------------------------
# qwen2_moe

QWEN2_MOE_GATINGS = ("softmax", "softmax_renorm")


def _check_qwen2_moe(model: nn.Module) -> None:
    _check_common("qwen2_moe", model, (*LLAMA_LIKE, "qwen2"), QWEN2_MOE_GATINGS, shared_ok=True)
    moes = [b for _, b in _blocks(model) if isinstance(b, MoEFeedForward)]
    kinds = {(b.num_experts, b.router.top_k, b.router.gating, b.experts.width,
              0 if b.shared is None else b.shared.width) for b in moes}
    if len(kinds) > 1:
        _refuse("qwen2_moe", f"its layers differ in experts, k, gating or widths ({sorted(kinds)})",
                "convert every layer with one FactorConfig")


def _write_qwen2_moe(model: nn.Module, target: Path, tokenizer) -> None:
    from transformers import Qwen2MoeConfig

    blocks = _blocks(model)
    moes = [(i, b) for i, b in blocks if isinstance(b, MoEFeedForward)]
    first = moes[0][1]
    shared = 0 if first.shared is None else first.shared.width
    dense_layers = [i for i, b in blocks if not isinstance(b, MoEFeedForward)]
    src = model.config
    config = Qwen2MoeConfig(
        **_config_kwargs(model), intermediate_size=getattr(src, "intermediate_size", first.experts.width),
        moe_intermediate_size=first.experts.width, shared_expert_intermediate_size=shared,
        num_experts=first.num_experts, num_experts_per_tok=first.router.top_k,
        norm_topk_prob=first.router.gating != "softmax", decoder_sparse_step=1, mlp_only_layers=dense_layers,
        qkv_bias=src.model_type == "qwen2" or bool(getattr(src, "attention_bias", False)),
        use_sliding_window=False, architectures=["Qwen2MoeForCausalLM"],
    )
    tensors = _base_weights(model, skip_ffn=False)
    tensors = {k: v for k, v in tensors.items() if ".mlp." not in k}
    for i, block in blocks:
        prefix = f"model.layers.{i}.mlp"
        if not isinstance(block, MoEFeedForward):  # kept dense through mlp_only_layers
            for name, t in block.state_dict().items():
                tensors[f"{prefix}.{name}"] = t
            continue
        scale = _expert_scale("qwen2_moe", block, QWEN2_MOE_GATINGS)
        I = block.experts.width
        tensors[f"{prefix}.gate.weight"] = block.router.net.weight
        for e in range(block.num_experts):
            tensors[f"{prefix}.experts.{e}.gate_proj.weight"] = block.experts.w_in[e, :I]
            tensors[f"{prefix}.experts.{e}.up_proj.weight"] = block.experts.w_in[e, I:]
            tensors[f"{prefix}.experts.{e}.down_proj.weight"] = block.experts.w_out[e] * scale
        if block.shared is not None:
            S = block.shared.width
            tensors[f"{prefix}.shared_expert.gate_proj.weight"] = block.shared.w_in[0, :S]
            tensors[f"{prefix}.shared_expert.up_proj.weight"] = block.shared.w_in[0, S:]
            # NOTE: Qwen2-MoE scales the shared expert by sigmoid(gate . x); a zero gate gives exactly 1/2,
            # so the shared expert's output projection is doubled.
            tensors[f"{prefix}.shared_expert.down_proj.weight"] = block.shared.w_out[0] * 2.0
        else:  # zero-width shared expert: present in the layout, contributes nothing
            D = block.experts.w_in.shape[2]
            for name, shape in (("gate_proj", (0, D)), ("up_proj", (0, D)), ("down_proj", (D, 0))):
                tensors[f"{prefix}.shared_expert.{name}.weight"] = block.experts.w_in.new_zeros(shape)
        D = block.experts.w_in.shape[2]
        tensors[f"{prefix}.shared_expert_gate.weight"] = block.experts.w_in.new_zeros(1, D)
    if config.qkv_bias:  # a Llama source has no attention biases: Qwen2-MoE's are then zero
        for i, _ in blocks:
            for proj in ("q_proj", "k_proj", "v_proj"):
                key = f"model.layers.{i}.self_attn.{proj}.bias"
                if key not in tensors:
                    w = tensors[f"model.layers.{i}.self_attn.{proj}.weight"]
                    tensors[key] = w.new_zeros(w.shape[0])
    _save_folder(model, target, config, tensors, tokenizer)


EXPORTERS.register("qwen2_moe")(Exporter(_check_qwen2_moe, _write_qwen2_moe))


# ---------------------------------------------------------------------------------------------------------------
# gguf (llama.cpp)

GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0", "q4_1")


def _is_dense(model: nn.Module) -> bool:
    return not any(isinstance(b, MoEFeedForward) for _, b in _blocks(model))


def _check_gguf(model: nn.Module) -> None:
    if _is_dense(model):  # the dense baseline, written the same way for a fair comparison
        if model.config.model_type not in LLAMA_LIKE or getattr(model.config, "mlp_bias", False):
            _refuse("gguf", f"dense {model.config.model_type!r} models are not written by this exporter",
                    "use llama.cpp's convert_hf_to_gguf.py for dense models")
    else:
        _check_common("gguf", model, LLAMA_LIKE, ("softmax_renorm",), shared_ok=False)
    rope = getattr(model.config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        _refuse("gguf", f"rope_type {rope.get('rope_type')!r} is not written by this exporter",
                "export to 'mixtral' and convert with llama.cpp's convert_hf_to_gguf.py")


def _rope_rows_for_gguf(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Q/K rows from transformers' rotate-half order to llama.cpp's interleaved order: [heads*hd, D]."""
    hd = w.shape[0] // heads
    return w.reshape(heads, 2, hd // 2, -1).transpose(1, 2).reshape(w.shape)  # (heads, hd/2, 2, D) -> rows


def gguf_tensor_map(model: nn.Module) -> dict[str, torch.Tensor]:
    """GGUF name -> tensor (fp32, transformers orientation) for a factorized Llama-family model."""
    cfg = model.config
    sd = model.state_dict()
    out = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"]}
    if not getattr(cfg, "tie_word_embeddings", False):
        out["output.weight"] = sd["lm_head.weight"]
    for i, block in _blocks(model):
        src, dst = f"model.layers.{i}", f"blk.{i}"
        out[f"{dst}.attn_norm.weight"] = sd[f"{src}.input_layernorm.weight"]
        out[f"{dst}.ffn_norm.weight"] = sd[f"{src}.post_attention_layernorm.weight"]
        out[f"{dst}.attn_q.weight"] = _rope_rows_for_gguf(sd[f"{src}.self_attn.q_proj.weight"], cfg.num_attention_heads)
        out[f"{dst}.attn_k.weight"] = _rope_rows_for_gguf(sd[f"{src}.self_attn.k_proj.weight"], cfg.num_key_value_heads)
        out[f"{dst}.attn_v.weight"] = sd[f"{src}.self_attn.v_proj.weight"]
        out[f"{dst}.attn_output.weight"] = sd[f"{src}.self_attn.o_proj.weight"]
        if not isinstance(block, MoEFeedForward):  # dense FFN
            out[f"{dst}.ffn_gate.weight"] = block.gate_proj.weight
            out[f"{dst}.ffn_up.weight"] = block.up_proj.weight
            out[f"{dst}.ffn_down.weight"] = block.down_proj.weight
            continue
        scale = _expert_scale("gguf", block, ("softmax_renorm",))
        I = block.experts.width
        out[f"{dst}.ffn_gate_inp.weight"] = block.router.net.weight  # [E, D]
        out[f"{dst}.ffn_gate_exps.weight"] = block.experts.w_in[:, :I]  # [E, I, D]
        out[f"{dst}.ffn_up_exps.weight"] = block.experts.w_in[:, I:]  # [E, I, D]
        out[f"{dst}.ffn_down_exps.weight"] = block.experts.w_out * scale  # [E, D, I]
    return {k: v.detach().float().contiguous() for k, v in out.items()}


def _write_gguf(model: nn.Module, target: Path, tokenizer, gguf_type: str = "f32",
                tokenizer_gguf: str | None = None) -> None:
    import gguf
    import numpy as np

    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"gguf_type={gguf_type!r}; choose one of {GGUF_TYPES}")
    cfg = model.config
    first = next(b for _, b in _blocks(model))
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    rope = getattr(cfg, "rope_parameters", None) or {}
    w = gguf.GGUFWriter(str(target), arch="llama")
    w.add_name(getattr(cfg, "_name_or_path", "") or "factorllm-moe")
    w.add_vocab_size(cfg.vocab_size)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    dense = _is_dense(model)
    w.add_feed_forward_length(first.gate_proj.out_features if dense else first.experts.width)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if not dense:
        w.add_expert_count(first.num_experts)
        w.add_expert_used_count(first.router.top_k)
    qtype = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0,
             "q4_1": gguf.GGMLQuantizationType.Q4_1}[gguf_type]
    w.add_file_type({"f32": 0, "f16": 1, "q8_0": 7, "q4_0": 2, "q4_1": 3}[gguf_type])
    _add_tokenizer(w, tokenizer, tokenizer_gguf)
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    for name, t in gguf_tensor_map(model).items():
        data = t.numpy()
        # NOTE: norms and rows the block size does not divide stay F32, as llama.cpp's own converter does.
        if data.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32 or data.shape[-1] % block:
            w.add_tensor(name, data.astype(np.float32))
        elif qtype == gguf.GGMLQuantizationType.F16:
            w.add_tensor(name, data.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(data.astype(np.float32), qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


_TOKENIZER_PREFIX = "tokenizer."


def _add_tokenizer(w, tokenizer, tokenizer_gguf: str | None) -> None:
    """Tokenizer metadata: copied from a source GGUF when given (exact), else built from a BPE tokenizer."""
    import gguf

    if tokenizer_gguf is not None:
        reader = gguf.GGUFReader(tokenizer_gguf)
        for field in reader.fields.values():
            if field.name.startswith(_TOKENIZER_PREFIX):
                value = field.contents()
                vtype = field.types[0]
                sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
                w.add_key_value(field.name, value, vtype, sub_type=sub)
        return
    if tokenizer is None:
        return  # tensors only: llama.cpp needs tokenizer metadata to run it
    import json

    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"cannot write a {model.get('type')} tokenizer to GGUF; pass tokenizer_gguf=<a GGUF "
                         "of the source model> to copy its tokenizer")
    vocab = tokenizer.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = set(tokenizer.all_special_ids)
    types = [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(len(tokens))]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for setter, tid in ((w.add_bos_token_id, tokenizer.bos_token_id), (w.add_eos_token_id, tokenizer.eos_token_id)):
        if tid is not None:
            setter(tid)


EXPORTERS.register("gguf")(Exporter(_check_gguf, _write_gguf, is_file=True))
