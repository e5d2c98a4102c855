"""Drawing helpers shared by every task family: named colours, two font faces, a canvas that records where
each piece of text landed, and the final noise pass.

Nothing is downloaded. The "sans" face is Pillow's embedded FreeType font (`ImageFont.load_default(size=...)`,
Pillow >= 10.1 built with FreeType); the "pixel" face is Pillow's built-in bitmap font scaled to the asked
size. When FreeType is unavailable every request falls back to the pixel face, so generation never fails.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Named colours the questions and answers may mention. Chosen to stay distinct after noise at 64-128 px.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (214, 39, 40),
    "green": (44, 160, 44),
    "blue": (31, 90, 200),
    "orange": (245, 130, 20),
    "purple": (140, 70, 180),
    "gray": (128, 128, 128),
    "yellow": (240, 210, 30),
    "pink": (240, 120, 190),
    "black": (20, 20, 20),
    "white": (250, 250, 250),
}

FACES = ("sans", "pixel")
_PIXEL_CAP_HEIGHT = 7.0  # cap height of Pillow's bitmap font, in its own pixels
_SANS_CAP_RATIO = 0.72  # cap height / em size of the embedded FreeType face
_MIN_PIXEL_SCALE = 0.85  # below this the shrunken bitmap font is illegible; such text is drawn in sans


@functools.lru_cache(maxsize=None)
def freetype_available() -> bool:
    """True when `load_default(size=...)` gives a scalable FreeType font (Pillow >= 10.1 with FreeType)."""
    try:
        return isinstance(ImageFont.load_default(size=12), ImageFont.FreeTypeFont)
    except (TypeError, OSError, ImportError):  # older Pillow has no `size`; builds without FreeType raise
        return False


@functools.lru_cache(maxsize=None)
def _sans_font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


@functools.lru_cache(maxsize=None)
def _bitmap_font() -> ImageFont.ImageFont:
    loader = getattr(ImageFont, "load_default_imagefont", None)
    return loader() if loader is not None else ImageFont.load_default()


def _pixel_scale(size: int) -> float:
    """How much to scale the bitmap font so its cap height matches a sans font of em `size`.

    Near 1 it snaps to exactly 1: a bitmap font resampled by a factor like 0.9 or 1.2 turns to mush.
    """
    scale = size * _SANS_CAP_RATIO / _PIXEL_CAP_HEIGHT
    return 1.0 if _MIN_PIXEL_SCALE <= scale <= 1.25 else scale


@functools.lru_cache(maxsize=4096)
def _pixel_mask(text: str, size: int) -> Image.Image:
    """Bitmap-font rendering of `text`, rescaled so its cap height matches a sans font of em `size`."""
    font = _bitmap_font()
    right = font.getbbox(text)[2]
    line = Image.new("L", (max(right, 1), 11), 0)
    ImageDraw.Draw(line).text((0, 0), text, fill=255, font=font)
    scale = _pixel_scale(size)
    width, height = max(1, round(right * scale)), max(1, round(11 * scale))
    # NEAREST keeps the blocky look of a pixel font when enlarging; BOX averages cleanly when shrinking.
    resample = Image.Resampling.NEAREST if scale >= 1.5 else Image.Resampling.BOX
    return line.resize((width, height), resample)


@dataclass(frozen=True)
class Font:
    face: str
    size: int

    def __post_init__(self):
        if self.face not in FACES:
            raise ValueError(f"font face must be one of {FACES}, got {self.face!r}")
        if self.size < 4:
            raise ValueError(f"font size must be >= 4 px, got {self.size}")

    def smaller(self) -> Font:
        """The same face one pixel smaller (layouts shrink text until it fits)."""
        return Font(self.face, self.size - 1)

    @property
    def effective_face(self) -> str:
        """The face actually drawn: sans needs FreeType; pixel gives way to sans where it would be shrunk."""
        if not freetype_available():
            return "pixel"
        if self.face == "pixel" and _pixel_scale(self.size) < _MIN_PIXEL_SCALE:
            return "sans"
        return self.face

    def measure(self, text: str) -> tuple[int, int]:
        """(width, height) of the box `Canvas.text` will give this text (height is per font, not per string)."""
        if self.effective_face == "pixel":
            return _pixel_mask(text, self.size).size
        font = _sans_font(self.size)
        left, _, right, _ = font.getbbox(text, anchor="ls")
        _, top, _, bottom = font.getbbox("Hg", anchor="ls")
        return right - left, bottom - top


@dataclass(frozen=True)
class TextBox:
    text: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive), image pixels
    role: str = ""  # what the text is in its layout, e.g. "total", "cell", "button"


@dataclass
class Canvas:
    """An RGB image plus a log of every string drawn on it and where; `unit` scales a 96-px design to `size`."""

    size: int
    background: tuple[int, int, int]
    image: Image.Image = field(init=False)
    draw: ImageDraw.ImageDraw = field(init=False)
    texts: list[TextBox] = field(default_factory=list)

    def __post_init__(self):
        self.image = Image.new("RGB", (self.size, self.size), self.background)
        self.draw = ImageDraw.Draw(self.image)

    @property
    def unit(self) -> float:
        return self.size / 96.0

    def px(self, design_pixels: float) -> int:
        """Convert a length in the 96-px design space to this canvas's pixels."""
        return int(round(design_pixels * self.unit))

    def font(self, face: str, design_size: float) -> Font:
        return Font(face, max(4, int(round(design_size * self.unit))))

    def text(self, xy: tuple[float, float], text: str, font: Font, fill, role: str = "",
             anchor: str = "lt") -> TextBox:
        """Draw `text` so its box's anchor point is `xy`; anchor is two letters: l/m/r then t/m/b."""
        width, height = font.measure(text)
        x, y = xy
        x -= {"l": 0, "m": width / 2, "r": width}[anchor[0]]
        y -= {"t": 0, "m": height / 2, "b": height}[anchor[1]]
        x, y = int(round(x)), int(round(y))
        if font.effective_face == "pixel":
            mask = _pixel_mask(text, font.size)
            self.image.paste(Image.new("RGB", mask.size, tuple(fill)), (x, y), mask)
        else:
            sans = _sans_font(font.size)
            left = sans.getbbox(text, anchor="ls")[0]
            top = sans.getbbox("Hg", anchor="ls")[1]
            self.draw.text((x - left, y - top), text, fill=tuple(fill), font=sans, anchor="ls")
        record = TextBox(text, (x, y, x + width, y + height), role)
        self.texts.append(record)
        return record

    def text_records(self) -> list[dict]:
        """Every string drawn so far as plain dicts (JSON-friendly) for `Example.meta["texts"]`."""
        return [{"text": t.text, "box": list(t.box), "role": t.role} for t in self.texts]

    def finish(self, rng: np.random.Generator, max_sigma: float = 5.0) -> Image.Image:
        """Add sensor-like Gaussian noise of a random strength in [0, max_sigma] and return the image."""
        sigma = float(rng.uniform(0.0, max_sigma))
        pixels = np.asarray(self.image, dtype=np.float32)
        noisy = pixels + rng.normal(0.0, 1.0, size=pixels.shape).astype(np.float32) * sigma
        return Image.fromarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8), "RGB")


def jitter(color, rng: np.random.Generator, amount: int = 12) -> tuple[int, int, int]:
    """A nearby shade of `color`, so layouts do not all share exactly the same RGB values."""
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in color)


def ink_for(background) -> tuple[int, int, int]:
    """Black or white text, whichever reads better on `background` (by relative luminance)."""
    r, g, b = background
    return (20, 20, 20) if 0.299 * r + 0.587 * g + 0.114 * b > 150 else (250, 250, 250)


def pick(rng: np.random.Generator, options, k: int | None = None, replace: bool = False):
    """rng.choice for plain Python sequences that keeps element types (numpy would turn str into np.str_)."""
    options = list(options)
    if k is None:
        return options[int(rng.integers(len(options)))]
    indices = rng.choice(len(options), size=k, replace=replace)
    return [options[int(i)] for i in indices]
