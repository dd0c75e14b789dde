"""`factorllm export`: write a factorized model in a format stock tools load (transformers, vLLM, llama.cpp)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a factorized model to mixtral, qwen2_moe or gguf")
    p.add_argument("--model", required=True, help="a folder written by `factorllm convert` (or factorllm.save)")
    p.add_argument("--format", required=True, choices=["mixtral", "qwen2_moe", "gguf"])
    p.add_argument("--output", required=True, help="output folder (or .gguf file for --format gguf)")
    p.add_argument("--gguf-type", default="f32", help="gguf weight type: f32, f16, q8_0, q4_0, q4_1")
    p.add_argument("--tokenizer-gguf", help="copy the tokenizer metadata from this GGUF (exact for llama.cpp); "
                   "default: the embedded model's GGUF when the model came from it, else built from the tokenizer")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from factorllm.export import export
    from factorllm.loading import load_model

    model, tok = load_model(args.model)
    options = {}
    if args.format == "gguf":
        options = {"gguf_type": args.gguf_type, "tokenizer_gguf": args.tokenizer_gguf}
        if args.tokenizer_gguf is None and _from_embedded(model):
            from factorllm.loading import embedded_gguf

            options["tokenizer_gguf"] = str(embedded_gguf("smollm2-135m"))
    out = export(model, args.output, args.format, tokenizer=tok, overwrite=args.overwrite, **options)
    print(f"wrote {out} ({args.format})")
    return 0


def _from_embedded(model) -> bool:
    cfg = model.config
    return (cfg.model_type, cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == ("llama", 576, 30, 49152)
