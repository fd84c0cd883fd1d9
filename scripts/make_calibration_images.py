"""
Draw the bundled calibration images (ream_modifiers/data/bundled/images/) and
their captions. They are small synthetic pictures, drawn here so that the
package ships no third-party images; rerun after changing a drawing:

    .venv/bin/python scripts/make_calibration_images.py
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageDraw

SIZE = 128
TARGET = Path(__file__).parents[1] / "ream_modifiers" / "data" / "bundled" / "images"


def _circle(draw: ImageDraw.ImageDraw) -> None:
    draw.ellipse((28, 28, 100, 100), fill=(220, 30, 30))


def _stripes(draw: ImageDraw.ImageDraw) -> None:
    for x in range(0, SIZE, 16):
        colour = (30, 60, 200) if x // 16 % 2 == 0 else (240, 210, 40)
        draw.rectangle((x, 0, x + 15, SIZE), fill=colour)


def _landscape(draw: ImageDraw.ImageDraw) -> None:
    draw.rectangle((0, 0, SIZE, 80), fill=(120, 180, 240))
    draw.rectangle((0, 80, SIZE, SIZE), fill=(40, 150, 60))
    draw.ellipse((90, 12, 116, 38), fill=(250, 220, 60))


def _chessboard(draw: ImageDraw.ImageDraw) -> None:
    for row in range(8):
        for col in range(8):
            if (row + col) % 2:
                draw.rectangle((col * 16, row * 16, col * 16 + 15, row * 16 + 15), 0)


def _sum(draw: ImageDraw.ImageDraw) -> None:
    draw.text((22, 50), "12 + 35 = 47", fill=(0, 0, 0))


def _bars(draw: ImageDraw.ImageDraw) -> None:
    draw.line((12, 116, 120, 116), fill=(0, 0, 0), width=2)
    for i, height in enumerate((40, 90, 65)):
        left = 24 + i * 32
        draw.rectangle((left, 116 - height, left + 20, 115), fill=(70, 90, 160))


def _face(draw: ImageDraw.ImageDraw) -> None:
    draw.ellipse((20, 20, 108, 108), fill=(250, 210, 60), outline=(0, 0, 0))
    draw.ellipse((44, 48, 54, 58), fill=(0, 0, 0))
    draw.ellipse((74, 48, 84, 58), fill=(0, 0, 0))
    draw.arc((42, 56, 86, 92), 20, 160, fill=(0, 0, 0), width=3)


def _code(draw: ImageDraw.ImageDraw) -> None:
    draw.rectangle((0, 0, SIZE, SIZE), fill=(30, 30, 30))
    for i, line in enumerate(("def area(r):", "    pi = 3.14", "    return pi*r*r")):
        draw.text((8, 30 + 18 * i), line, fill=(180, 230, 150))


DRAWINGS: dict[str, tuple[Callable[[ImageDraw.ImageDraw], None], str]] = {
    "circle": (_circle, "A red circle in the middle of a white square."),
    "stripes": (_stripes, "Vertical stripes that alternate between blue and yellow."),
    "landscape": (_landscape, "A blue sky over green grass, with a yellow sun."),
    "chessboard": (_chessboard, "A chessboard of black and white squares."),
    "sum": (_sum, "The sum 12 + 35 = 47 written in black on white."),
    "bars": (_bars, "A bar chart with three blue bars; the middle bar is tallest."),
    "face": (_face, "A yellow smiling face with two black eyes."),
    "code": (_code, "Python code on a dark screen: a function computing an area."),
}


def main() -> None:
    TARGET.mkdir(parents=True, exist_ok=True)
    captions = []
    for name, (draw_into, caption) in DRAWINGS.items():
        image = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
        draw_into(ImageDraw.Draw(image))
        image.save(TARGET / f"{name}.png", optimize=True)
        captions.append({"image": f"{name}.png", "text": caption})
    lines = [json.dumps(entry) for entry in captions]
    (TARGET / "captions.jsonl").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
