"""A contact sheet (examples per family, with question and answer under each) for eyeballing legibility.

    python -m dsvl_jax.tasks.contact_sheet --image-size 96 --per-family 4 --out /tmp/tasks_contact_sheet.png
"""
from __future__ import annotations

import argparse
import textwrap

from PIL import Image, ImageDraw, ImageFont

from .difficulty import DIFFICULTIES
from .suite import FAMILIES, generate


def contact_sheet(image_size: int = 96, per_family: int = 4, seed: int = 0, zoom: int = 2,
                  families=FAMILIES, difficulty: str = "standard") -> Image.Image:
    """One row per family; each tile is an example enlarged `zoom` times (nearest) with its Q/A printed below."""
    tile_w = image_size * zoom + 8
    caption_h = 44
    tile_h = image_size * zoom + caption_h
    sheet = Image.new("RGB", (tile_w * per_family + 70, tile_h * len(families)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for row, family in enumerate(families):
        draw.text((4, row * tile_h + 4), family, fill=(0, 0, 0), font=font)
        for col in range(per_family):
            example = generate(family, seed, col, image_size, difficulty)
            x, y = 70 + col * tile_w, row * tile_h
            sheet.paste(example.image.resize((image_size * zoom,) * 2, Image.Resampling.NEAREST), (x, y))
            caption = textwrap.wrap(f"Q: {example.question}", width=max(20, tile_w // 6))[:2]
            caption.append(f"A: {example.answer}   [{example.kind}]")
            for k, line in enumerate(caption):
                draw.text((x, y + image_size * zoom + 2 + 12 * k), line, fill=(0, 0, 120), font=font)
    return sheet


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--per-family", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--zoom", type=int, default=2)
    parser.add_argument("--difficulty", default="standard", choices=sorted(DIFFICULTIES))
    parser.add_argument("--out", default="/tmp/tasks_contact_sheet.png")
    args = parser.parse_args(argv)
    sheet = contact_sheet(args.image_size, args.per_family, args.seed, args.zoom, difficulty=args.difficulty)
    sheet.save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
