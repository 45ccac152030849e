# %% [markdown]
# # mimprobe quickstart: from Python
#
# Extract a small token cache, open it, probe three heads, plot them, train a head of your own on the cached tokens
# with `mimprobe.token_loader`, then one written as a `GridHead` through `mimprobe.probe`. Runs offline on the
# built-in procedural dataset (`demo:`, 400 train / 160 eval images) with a **random-init** ViT-Tiny at 128 px:
# about 15 s of CPU time (measured: 14.4 s user, 50 s wall on a shared 2-core VM at load 10). The numbers show the
# mechanism, not a model's quality. The cells (`# %%`) open as a notebook in VS Code, PyCharm or Jupyter
# (jupytext).
#
# Run it as a script: `python examples/quickstart.py` (writes `quickstart-out/`, or `$MIMPROBE_QUICKSTART`).

# %%
import os

import torch

import mimprobe

OUT = os.environ.get("MIMPROBE_QUICKSTART", "quickstart-out")
TRAIN, EVAL = f"{OUT}/train.zarr", f"{OUT}/eval.zarr"

# %% [markdown]
# ## 1. Extract once
# The same options as `mimprobe extract` (here: no pretrained weights, 128 px); a finished store is not redone.

# %%
for path, data in ((TRAIN, "demo:train:400"), (EVAL, "demo:test:160")):
    result = mimprobe.extract("vit_tiny_patch16_224", data, path, pretrained=False, img_size=128, crop_pct=1.0,
                              batch_size=100, device="cpu", quiet=True)
    print(result.summary())

# %% [markdown]
# ## 2. Open a store
# N samples × T tokens (prefix + patch) × D channels; tokens come back as float32 whatever the stored dtype.

# %%
store = mimprobe.open_store(TRAIN)
print(store)
print("classes:", store.class_names, "| first labels:", store.labels[:8].tolist(), "| ids:", store.sample_ids[:2])
x = store.read([0, 5, 7])  # (3, T, D) float32
print("tokens of 3 rows:", tuple(x.shape), x.dtype, "| [cls] norm of row 0:", float(x[0, 0].norm()))

# %% [markdown]
# ## 3. Probe three heads
# Keyword options are `mimprobe probe`'s (`ProbeOptions`); each head's grid is chosen on validation rows of the
# train store, the eval store only reports. The grid and steps are small to stay quick.

# %%
results = mimprobe.probe(TRAIN, EVAL, heads=["linear-cls", "linear-mean", "abmilp"], lrs=[1e-3, 3e-3], wds=[5e-4],
                         epochs=20, min_steps=0, batch_size=64, device="cpu", quiet=True,
                         out=f"{OUT}/results.jsonl")
print(results.table())

# %% [markdown]
# ## 4. Plot
# Each record is a dict (the JSON line `--out` writes); `results.to_pandas()` gives a DataFrame where pandas is
# installed, and `mimprobe.load_results("results.jsonl")` reads them back later.

# %%
import matplotlib  # noqa: E402

if not os.environ.get("DISPLAY") and "ipykernel" not in os.environ.get("_", ""):
    matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

names = [r["head"] for r in results]
top1 = [100 * r["metrics"]["eval_top1"] for r in results]
fig, ax = plt.subplots(figsize=(5, 3))
ax.bar(names, top1, color=["#999", "#999", "#c44"])
ax.set_ylabel("eval top-1 (%)")
ax.set_title("random-init ViT-Tiny, demo glyphs")
fig.tight_layout()
fig.savefig(f"{OUT}/heads.png", dpi=100)
print("wrote", f"{OUT}/heads.png")

# %% [markdown]
# ## 5. Your own head, your own loop
# `token_loader` is the reader `mimprobe probe` streams with (whole chunks in a shuffled order, rows shuffled
# within a buffer of chunks, a reader thread ahead of the loop); every epoch yields every requested row once.
# Here: a one-query attention pooling in plain PyTorch. Validation rows would choose its lr; this cell just
# trains one.


# %%
class OneQueryPool(torch.nn.Module):
    def __init__(self, dim: int, classes: int):
        super().__init__()
        self.score = torch.nn.Linear(dim, 1)
        self.norm = torch.nn.BatchNorm1d(dim, affine=False)
        self.fc = torch.nn.Linear(dim, classes)

    def forward(self, tokens):  # (B, T, D) → logits (B, C)
        patches = tokens[:, 1:]  # drop [cls]
        a = self.score(patches).softmax(1)  # (B, N, 1) over the patch tokens
        return self.fc(self.norm((a * patches).sum(1)))


torch.manual_seed(0)
train_rows = store.valid_rows(labelled=True)
head = OneQueryPool(store.D, len(store.class_names))
opt = torch.optim.AdamW(head.parameters(), lr=3e-3, weight_decay=5e-4)
loader = mimprobe.token_loader(store, train_rows, batch_size=64, seed=0)
for epoch in range(10):
    for tokens, labels, rows in loader:  # each loop is one epoch, in its own order
        loss = torch.nn.functional.cross_entropy(head(tokens), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()

head.eval()
correct = total = 0
with torch.no_grad(), mimprobe.token_loader(EVAL, batch_size=256, shuffle=False) as ev:
    for tokens, labels, rows in ev:
        correct += int((head(tokens).argmax(1) == labels).sum())
        total += len(labels)
print(f"OneQueryPool, own loop: eval top-1 {100 * correct / total:.1f}% on {total} rows (last loss {loss.item():.3f})")

# %% [markdown]
# ## 6. Your own head, trained by mimprobe
# To give a head everything the built-in heads get (a whole lr × wd grid in one pass, selection on validation
# rows, records, `--save-heads`, `predict`, `heatmap`), write it as a `GridHead`: `examples/custom_head.py` holds
# `QueryPool` (docs/heads.md, "Your own head"). Pass the class, or its import path as `--head` takes it
# (`custom_head:QueryPool:tau=0.5`).

# %%
from custom_head import QueryPool  # noqa: E402  (examples/ is on the path when this file runs, or is the cwd)

mine = mimprobe.probe(TRAIN, EVAL, heads=[QueryPool], lrs=[3e-3, 1e-2], wds=[5e-4], epochs=20, min_steps=0,
                      batch_size=64, device="cpu", quiet=True, out=f"{OUT}/results.jsonl")
print(mine.table())
