"""What ``mimprobe info`` shows about a store."""

from __future__ import annotations

from mimprobe.cache_store.store import TokenStore
from mimprobe.units import human_bytes


def weights_line(model: dict) -> str:
    w = model.get("weights")
    if w == "pretrained":
        return f"pretrained ({model.get('hf_hub_id') or model.get('tag') or 'timm default'})"
    if w == "checkpoint":
        src = model.get("checkpoint_source")
        return (f"checkpoint {model.get('checkpoint')} (sha256 {str(model.get('checkpoint_sha256'))[:12]}"
                + (f"; encoder at {' > '.join(src)}" if src else "") + ")")
    return "RANDOM INIT (--no-pretrained): not the model's real features"


def describe(store: TokenStore) -> list[tuple[str, str]]:
    a = store.attrs
    m, ds, pp = a["model"], a.get("dataset", {}), a.get("preprocessing", {})
    done = store.done()
    n_cls = ds.get("num_classes", 0)
    rows = [
        ("store", f"{store.path} ({store.format})"),
        ("model", f"{m['name']} ({m['architecture']}, {m['num_blocks']} blocks, patch {m['patch_size'][0]}, "
                  f"{m['img_size'][0]}x{m['img_size'][1]} px)"),
        ("weights", weights_line(m)),
        ("dataset", f"{ds.get('source')} {ds.get('root')}" + (f" [{ds['split']}]" if ds.get("split") else "")
         + f", {n_cls} classes"),
        ("samples (N)", str(store.num_samples)),
        ("tokens (T)", f"{store.num_tokens} = {m['num_prefix_tokens']} prefix + {m['num_patches']} patch"),
        ("prefix tokens", f"{m['num_prefix_tokens']} ({'[cls]' if m.get('has_class_token') else 'no [cls]'}"
                          + (f" + {m['num_reg_tokens']} registers" if m.get("num_reg_tokens") else "")
                          + (f"; order {', '.join(m['prefix_tokens'])}" if m.get("prefix_tokens") else "") + ")"),
        ("token grid", f"{m['grid_size'][0]}x{m['grid_size'][1]}, stride {m['patch_size'][0]} px"
                       + (f" ({m['family']} family)" if m.get("family") else "")),
        ("dim (D)", str(store.dim)),
        ("dtype", a["dtype"] + (f" ({a['quantization']['scheme']})" if a.get("quantization") else "")),
        *codec_rows(store),
        ("blocks", ", ".join(str(k) for k in store.layers) + " (tokens = last block, before the final norm)"),
        ("final norm", (f"{m['final_norm']['kind']} from model.{m['final_norm']['module']} (stored; --final-norm)"
                        + (", which the model applies to the pooled vector"
                           if m["final_norm"].get("applies_to") == "pooled" else "")
                        if m.get("final_norm") else "none")),
        ("views", str(store.num_views) if store.num_views else "center crop only"),
        ("attention", attention_line(store.attrs.get("attention"))),
        ("preprocessing", f"{pp.get('input_size')} {pp.get('interpolation')} crop_pct={pp.get('crop_pct')} "
                          f"mean={pp.get('mean')} std={pp.get('std')}"),
        ("chunks", f"{int(done.sum())}/{store.num_chunks} done ({store.chunk_rows} rows each)"),
        ("complete", _complete(store)),
        ("skipped", str(len(a.get("skipped", [])))),
        ("size on disk", human_bytes(store.size_on_disk())),
    ]
    return rows


def attention_line(att: dict | None) -> str:
    if not att:
        return "not stored (extract --store-attention)"
    return (f"[cls]→patch of block {att['block']}: {att['heads']} heads × {att['patches']} patches, {att['dtype']} "
            "(softmax over all tokens, patch columns kept)")


def codec_rows(store: TokenStore) -> list[tuple[str, str]]:
    """Codec, bytes per token, size against float16 and the recorded reconstruction error."""
    codec, t, d = store.codec, store.num_tokens, store.dim
    per_row = codec.bytes_per_row(t, d)
    rows = [("codec", f"{codec.spec}: {codec.describe()}"
             + (f"; prefix tokens ({codec.num_prefix}) kept in float16" if codec.keep_prefix else "")
             + ("; each row's patch-token mean kept in float16" if codec.keep_mean else "")
             + (f"; parameters {codec.fingerprint}" if codec.fingerprint else "")),
            ("bytes / token", f"{per_row / t:.1f} ({per_row / (2 * t * d):.4f}x of float16)")]
    err = (store.attrs.get("codec") or {}).get("error")
    if err:
        rows.append(("coding error", f"relative L2 per token mean {err['rel_l2_mean']:.4f} (median "
                     f"{err['rel_l2_median']:.4f}, max {err['rel_l2_max']:.4f}), cosine mean {err['cosine_mean']:.5f}"
                     f" (min {err['cosine_min']:.4f}); {err['tokens']} tokens of {err['rows']} rows, seed {err['seed']}"))
    return rows


def _complete(store: TokenStore) -> str:
    """"yes" only when every chunk is done and every done chunk's files are there at full size (a cheap look,
    no data read: ``mimprobe verify`` reads and checksums them)."""
    from mimprobe.cache_store.verify import presence_problems

    problems = presence_problems(store, limit=4)
    if problems:
        more = ", ..." if len(problems) > 3 else ""
        return (f"NO: DAMAGED ({'; '.join(problems[:3])}{more}); run `mimprobe verify {store.path}`, then repair "
                "with the same `mimprobe extract` command and --repair")
    if not store.complete:
        return "no"
    how = "listed" if store.backend.is_remote else "present at full size"
    return f"yes (chunk files {how}; `mimprobe verify` checks their contents)"
