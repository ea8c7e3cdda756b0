"""Draw the U-Net of a preset from the network itself: docs/unet.png.

python docs/make_unet_diagram.py            # flowers64
python docs/make_unet_diagram.py sd128
"""

import argparse
import sys
from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.patches import FancyBboxPatch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lib.unet import PRESETS, build_unet, count_parameters, model_config


def box(ax, x, y, text, color):
    ax.add_patch(
        FancyBboxPatch((x - 1.3, y - 0.33), 2.6, 0.66, boxstyle="round,pad=0.04", fc=color, ec="0.3")
    )
    ax.text(x, y, text, ha="center", va="center", fontsize=8)


def arrow(ax, x0, y0, x1, y1, color="0.3"):
    ax.annotate("", (x1, y1), (x0, y0), arrowprops=dict(arrowstyle="->", color=color, lw=1.2))


def draw_level(ax, model, cfg, i, top):
    """Down level i on the left, its up level on the right, the skips between them."""
    levels, depth = len(cfg["widths"]) - 1, cfg["block_depth"]
    y, res, w = top - 1 - i, cfg["image_size"] // 2**i, cfg["widths"][i]
    down, up = model.down_blocks[i], model.up_blocks[levels - 1 - i]
    left, right = 1.5 + 0.9 * i, 9.5 - 0.9 * i
    text = f"{depth} res blocks, {w} ch @ {res}²\n{count_parameters(down):,} params, then avg-pool 2x"
    box(ax, left, y, text, "#cfe3ff")
    text = f"upsample 2x, {depth} res blocks\n{w} ch @ {res}², {count_parameters(up):,} params"
    box(ax, right, y, text, "#ffe0c2")
    arrow(ax, left + 1.35, y, right - 1.35, y, color="#4a8")
    ax.text(5.5, y + 0.08, f"{depth} skips", ha="center", fontsize=7, color="#4a8")
    arrow(ax, left, y + 0.67 if i else top - 0.35, left, y + 0.35)  # from the level above (or the input)
    arrow(ax, right, y + 0.35, right, y + 0.67)


def draw_unet(preset="flowers64"):
    """A U: down levels on the left, the bottleneck at the bottom, up levels on the right, skip
    connections across. Widths, resolutions and parameter counts come from the built network."""
    cfg = model_config(preset)
    model = build_unet(cfg)
    size, levels, depth = cfg["image_size"], len(cfg["widths"]) - 1, cfg["block_depth"]
    fig, ax = plt.subplots(figsize=(11, 1.3 * (levels + 2)))
    ax.set_xlim(0, 11)
    ax.set_ylim(-0.8, levels + 1.6)
    ax.axis("off")
    top = levels + 1
    text = f"noisy image 3 x {size}²\n+ noise variance -> sin/cos embedding ({cfg['embedding_dim']})"
    if model.cond_mlp is not None:
        text += f"\n-> MLP for every block ({count_parameters(model.cond_mlp):,} params)"
    box(ax, 1.5, top, text, "#eeeeee")
    text = f"predicted noise 3 x {size}²\nout_conv 1x1 ({count_parameters(model.out_conv):,} params)"
    box(ax, 9.5, top, text, "#eeeeee")
    for i in range(levels):
        draw_level(ax, model, cfg, i, top)
    yb, res = top - 1 - levels, size // 2**levels
    attention = model.attention is not None
    params = count_parameters(model.bottleneck) + (count_parameters(model.attention) if attention else 0)
    text = (
        f"bottleneck: {depth} res blocks, {cfg['widths'][-1]} ch @ {res}²\n"
        f"{'+ self-attention, ' if attention else ''}{params:,} params"
    )
    box(ax, 5.5, yb, text, "#d9f2d0")
    arrow(ax, 1.5 + 0.9 * (levels - 1), yb + 0.67, 4.2, yb)
    arrow(ax, 6.8, yb, 9.5 - 0.9 * (levels - 1), yb + 0.67)
    norm = "BN, scaled and shifted by the MLP" if model.cond_mlp is not None else "BN"
    act = {"leaky_relu": "LeakyReLU", "silu": "SiLU"}[cfg.get("activation", "leaky_relu")]
    ax.set_title(
        f"U-Net '{preset}': {count_parameters(model):,} parameters "
        f"(res block: [1x1 conv if the width changes] -> {norm} -> 3x3 conv -> {act} -> 3x3 conv, + input)",
        fontsize=9,
    )
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Draw a preset's U-Net, read from the network itself.")
    p.add_argument("preset", nargs="?", default="flowers64", choices=sorted(PRESETS))
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "unet.png"))
    args = p.parse_args()
    draw_unet(args.preset).savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
