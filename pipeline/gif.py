"""Decodes a GIF file into the frames a viewer sees and how long each is shown.

One pass over the file: the block structure is parsed here, so every size and count is checked against
`DecodeLimits` before any pixel buffer exists; each frame's LZW data is decoded by Pillow's C decoder; the frames are
composited on the logical screen in numpy, following the GIF89a disposal rules as ImageMagick's `-coalesce` and
browsers do. `tests/test_gif.py` holds the result to ImageMagick's on Pillow's collection of awkward GIFs.

Conventions a caller can rely on:
  * Pixels that no frame has painted (transparent ones) are `BACKGROUND_RGB`, white. GIF transparency is one bit,
    so the edges of a transparent GIF are pre-blended with the page colour its author had in mind, and that is
    white far more often than not; flattening onto white hides those fringes instead of outlining every sticker.
  * "Restore to background" (disposal 2) clears the frame's rectangle to transparent, i.e. to `BACKGROUND_RGB`, as
    ImageMagick and browsers do; the logical screen's background colour index is ignored, as they ignore it.
  * "Restore to previous" (disposal 3) on the first frame restores the empty (transparent) screen.
  * "Unspecified" (0) and the undefined disposal values (4-7) act like "do not dispose" (1).
  * A frame with neither a local nor a global colour table is drawn in black, and an index past the end of its
    colour table takes the table's first colour: the specification leaves both open, and this is what ImageMagick
    does.
  * Parts of a frame outside the logical screen are clipped away; the screen never grows.
  * Delays of `BROWSER_MIN_DELAY_MS` or less (0 and 1 centisecond) count as `BROWSER_DEFAULT_DELAY_MS`: browsers
    play them so, and GIFs are made to be watched in browsers (a 0 delay would otherwise mean infinitely fast).
  * A stray byte between blocks is skipped, as the GIF87a specification asks and ImageMagick and Pillow do (some
    files carry a second GIF header after a frame, from being concatenated).
  * A file cut short inside a block fails with reason "truncated", as it does in ImageMagick: keeping its first
    frames would pass a prefix of the animation off as the clip its caption describes; the fix is to fetch the file
    again. A file that ends cleanly between blocks without the trailer byte is complete (many encoders omit the
    trailer and every viewer plays such files).
  * A frame whose LZW data stops early or turns invalid, inside an intact block structure, keeps the pixels decoded
    up to there and leaves the rest unpainted, as browsers show it (ImageMagick rejects the whole file). Captions
    were written by people watching GIFs in browsers, so the browser's picture is the one that matches them.
"""

from __future__ import annotations

import contextlib
import struct
from dataclasses import dataclass

import numpy as np
from PIL import Image

GIF_SIGNATURES = (b"GIF87a", b"GIF89a")
BACKGROUND_RGB = (255, 255, 255)
# Chromium, Firefox and Safari raise delays of 0 and 1 centisecond to 100 ms.
BROWSER_MIN_DELAY_MS = 10
BROWSER_DEFAULT_DELAY_MS = 100

_TRAILER = 0x3B
_EXTENSION = 0x21
_IMAGE_DESCRIPTOR = 0x2C
_GRAPHIC_CONTROL = 0xF9
_DISPOSE_BACKGROUND = 2
_DISPOSE_PREVIOUS = 3
_PIXEL = np.dtype("V3")  # one RGB pixel as an opaque 3-byte item: numpy copies these far faster than [..., 3] rows
_NO_PALETTE = np.zeros((256, 3), np.uint8).view(_PIXEL)[:, 0]
_MAX_MIN_CODE_SIZE = 11  # LZW codes are at most 12 bits, and the code table needs room beyond the literal codes


class GifError(ValueError):
    """A GIF that cannot be decoded. `reason` is a short stable phrase for counters and dead-letter records:
    "not a gif", "truncated", "corrupt", "zero-size canvas", "zero-size frame", "no frames", "decompression bomb",
    "too many frames", "too large"."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class DecodeLimits:
    """Guards against files made to exhaust a worker; all are checked before any frame is decoded.

    The defaults admit any GIF a person would watch (a 4096 x 4096 screen; 10,000 frames, over 15 minutes at 10 fps)
    and keep one decoded GIF within 1 GiB of memory.
    """

    # Area of the logical screen, and of the screen grown to enclose every frame's rectangle ("decompression bomb").
    max_canvas_pixels: int = 4096 * 4096
    max_frames: int = 10_000  # "too many frames"
    max_decoded_bytes: int = 1 << 30  # size of the decoded uint8 [N, H, W, 3] array ("too large")


@dataclass(frozen=True)
class DecodedGif:
    frames: np.ndarray  # uint8 [N, H, W, 3], each the whole logical screen as shown while that frame is on
    durations_ms: np.ndarray  # int32 [N], how long each frame is shown, after the browser rule for short delays


@dataclass(frozen=True)
class _Frame:
    """One image block as parsed: where its LZW data lies and how to draw it; no pixels yet."""

    left: int
    top: int
    width: int
    height: int
    interlaced: bool
    palette: np.ndarray  # [256] of _PIXEL
    min_code_size: int
    lzw: slice  # the LZW data sub-blocks in the file, terminator included
    transparent_index: int | None
    disposal: int
    delay_cs: int


def is_gif(data: bytes) -> bool:
    """True when `data` starts with a GIF signature (the content decides, not the file name)."""
    return data[:6] in GIF_SIGNATURES


def decode(data: bytes, limits: DecodeLimits = DecodeLimits()) -> DecodedGif:
    """Decodes every frame of a GIF, composited as a viewer shows it. Raises GifError for anything undecodable."""
    width, height, frames = _parse(data, limits)
    if len(frames) * height * width * 3 > limits.max_decoded_bytes:
        raise GifError(
            "too large", f"{len(frames)} frames of {width}x{height} exceed {limits.max_decoded_bytes} decoded bytes"
        )
    delays_ms = np.array([frame.delay_cs for frame in frames], np.int32) * 10
    return DecodedGif(frames=_composite(data, width, height, frames), durations_ms=browser_durations_ms(delays_ms))


def browser_durations_ms(delays_ms: np.ndarray) -> np.ndarray:
    """Delays as stored (in ms) -> durations as browsers play them, int32."""
    delays_ms = np.asarray(delays_ms)
    return np.where(delays_ms <= BROWSER_MIN_DELAY_MS, BROWSER_DEFAULT_DELAY_MS, delays_ms).astype(np.int32)


class _Reader:
    """Bounds-checked cursor over the file: running off its end means the file was cut."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def at_end(self) -> bool:
        return self.pos >= len(self.data)

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise GifError("truncated", f"needed {n} bytes at offset {self.pos}, the file has {len(self.data)}")
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def u8(self) -> int:
        return self.take(1)[0]

    def sub_blocks(self) -> slice:
        """Skips a chain of data sub-blocks up to and including its empty terminator; returns where it lies."""
        data, start, pos = self.data, self.pos, self.pos
        while pos < len(data):
            size = data[pos]
            pos += 1 + size
            if size == 0:
                self.pos = pos
                return slice(start, pos)
        raise GifError("truncated", f"the data sub-blocks from offset {start} run past the end of the file")

    def palette(self, flags: int) -> np.ndarray:
        """A colour table of 2**(flags&7 + 1) entries, padded to 256 with its first colour (see the module doc)."""
        size = 2 ** ((flags & 7) + 1)
        table = np.frombuffer(self.take(3 * size), np.uint8).reshape(size, 3)
        padded = np.empty((256, 3), np.uint8)
        padded[:size] = table
        padded[size:] = table[0]
        return padded.view(_PIXEL)[:, 0]


def _parse(data: bytes, limits: DecodeLimits) -> tuple[int, int, list[_Frame]]:
    """Walks the block structure (header, logical screen, then extensions and images up to the trailer)."""
    if not is_gif(data):
        raise GifError("not a gif", f"starts with {bytes(data[:6])!r}, not GIF87a or GIF89a")
    reader = _Reader(data)
    reader.take(6)
    # The background colour index (ignored, see the module doc) and the pixel aspect ratio are not needed.
    width, height, flags, _, _ = struct.unpack("<2H3B", reader.take(7))
    if width == 0 or height == 0:
        raise GifError("zero-size canvas", f"the logical screen is {width}x{height}")
    if width * height > limits.max_canvas_pixels:
        raise GifError(
            "decompression bomb", f"the logical screen {width}x{height} exceeds {limits.max_canvas_pixels} px"
        )
    global_palette = reader.palette(flags) if flags & 0x80 else _NO_PALETTE
    frames: list[_Frame] = []
    control = (None, 0, 0)  # (transparent index, disposal, delay) of the next image, from its graphic control block
    grown_width, grown_height = width, height
    while not reader.at_end():
        introducer = reader.u8()
        if introducer == _TRAILER:
            break
        if introducer == _EXTENSION:
            label = reader.u8()
            extent = reader.sub_blocks()
            block = data[extent.start : extent.start + 5]  # the first sub-block: size, packed, delay, transparent
            if label == _GRAPHIC_CONTROL and len(block) == 5 and block[0] >= 4:
                packed, delay_cs = block[1], block[2] | block[3] << 8
                control = (block[4] if packed & 1 else None, (packed >> 2) & 7, delay_cs)
            continue
        if introducer != _IMAGE_DESCRIPTOR:
            continue  # a stray byte (see the module doc)
        left, top, frame_width, frame_height, frame_flags = struct.unpack("<4HB", reader.take(9))
        if frame_width == 0 or frame_height == 0:
            raise GifError("zero-size frame", f"frame {len(frames)} is {frame_width}x{frame_height}")
        # Decoders that grow the screen to enclose every frame (Pillow does) would need this area. A file asking for
        # an absurd one is made to exhaust decoders, even though clipping, as done here, would defuse it.
        grown_width, grown_height = max(grown_width, left + frame_width), max(grown_height, top + frame_height)
        if grown_width * grown_height > limits.max_canvas_pixels:
            raise GifError(
                "decompression bomb",
                f"frame {len(frames)} ({frame_width}x{frame_height} at {left},{top}) reaches out to"
                f" {grown_width}x{grown_height}, over {limits.max_canvas_pixels} px",
            )
        if len(frames) == limits.max_frames:
            raise GifError("too many frames", f"more than {limits.max_frames}")
        palette = reader.palette(frame_flags) if frame_flags & 0x80 else global_palette
        min_code_size = reader.u8()
        if not 1 <= min_code_size <= _MAX_MIN_CODE_SIZE:
            raise GifError(
                "corrupt",
                f"frame {len(frames)}: LZW minimum code size {min_code_size} is not in 1..{_MAX_MIN_CODE_SIZE}",
            )
        transparent_index, disposal, delay_cs = control
        control = (None, 0, 0)  # a graphic control block applies to one image only
        frames.append(
            _Frame(
                left=left,
                top=top,
                width=frame_width,
                height=frame_height,
                interlaced=bool(frame_flags & 0x40),
                palette=palette,
                min_code_size=min_code_size,
                lzw=reader.sub_blocks(),
                transparent_index=transparent_index,
                disposal=disposal,
                delay_cs=delay_cs,
            )
        )
    if not frames:
        raise GifError("no frames", "the file holds no image")
    return width, height, frames


def _decode_indices(data: bytes, frame: _Frame) -> tuple[np.ndarray, np.ndarray | None]:
    """Colour indices uint8 [h, w] of one frame, and which of them its LZW data covers (None: all)."""
    size, lzw, args = (frame.width, frame.height), data[frame.lzw], (frame.min_code_size, frame.interlaced, -1)
    image = Image.new("L", size, 0)
    try:
        image.frombytes(lzw, "gif", *args)
        return np.asarray(image), None
    except ValueError:  # the LZW data stopped before the last pixel or turned invalid: Pillow keeps what it wrote
        pass
    # Which pixels were written shows by decoding again onto another fill value: a written pixel has the same value
    # in both images, an unwritten one is 0 in the first and 255 in the second.
    other = Image.new("L", size, 255)
    with contextlib.suppress(ValueError):
        other.frombytes(lzw, "gif", *args)
    indices = np.asarray(image)
    return indices, indices == np.asarray(other)


def _composite(data: bytes, width: int, height: int, frames: list[_Frame]) -> np.ndarray:
    """Draws the frames in order on the logical screen, disposing of each as it asks before drawing the next."""
    out = np.empty((len(frames), height, width, 3), np.uint8)
    screen = np.empty((height, width, 3), np.uint8)
    screen[:] = BACKGROUND_RGB
    pixels = screen.view(_PIXEL)[..., 0]  # [H, W], the same memory
    background = np.array(BACKGROUND_RGB, np.uint8).view(_PIXEL)[0]
    for i, frame in enumerate(frames):
        # The part of the frame's rectangle that lies on the screen.
        x0, y0 = min(frame.left, width), min(frame.top, height)
        x1, y1 = min(frame.left + frame.width, width), min(frame.top + frame.height, height)
        region = pixels[y0:y1, x0:x1]
        saved = region.copy() if frame.disposal == _DISPOSE_PREVIOUS else None
        indices, painted = _decode_indices(data, frame)
        indices = indices[: y1 - y0, : x1 - x0]
        if painted is not None:
            painted = painted[: y1 - y0, : x1 - x0]
        if frame.transparent_index is not None:
            opaque = indices != frame.transparent_index
            painted = opaque if painted is None else painted & opaque
        if painted is None:
            np.take(frame.palette, indices, out=region)
        else:
            np.copyto(region, frame.palette[indices], where=painted)
        out[i] = screen
        if frame.disposal == _DISPOSE_BACKGROUND:
            region[...] = background
        elif saved is not None:
            region[...] = saved
    return out
