"""Decodes a GIF file into the frames a viewer sees and how long each is shown.

Two steps. `parse` walks the block structure, so every size and count is checked against `DecodeLimits`, and every
frame's timing (from its Graphic Control Extension) is known, before any pixel buffer exists. `Animation.screens`
then streams: it composites the frames one by one on a single logical screen, in numpy, following the GIF89a disposal
rules as ImageMagick's `-coalesce` and browsers do, and yields the screen whenever a frame asked for is on, so memory
is one screen whatever the frame count (pipeline/clip_frames.py keeps only the frames it samples, resized). Frames
that a later opaque full-screen frame hides before the next one asked for are not decoded at all. Each frame's LZW
data is decoded by Pillow's C decoder. `decode` collects every frame, for callers that want them all.
`tests/test_gif.py` holds the result to ImageMagick's on Pillow's collection of awkward GIFs and real animations.

The screen is kept as one 32-bit word per pixel, RGBX (X, a padding byte, is 0): numpy moves aligned words far faster
than 3-byte pixels, and Pillow reads that layout in place (`Image.frombuffer(..., "RGBX")`), so a kept frame is
resized without a conversion.

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

import bisect
import contextlib
import struct
from collections.abc import Iterable, Iterator
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
_PIXEL = np.dtype("<u4")  # one RGBX pixel, R in the lowest byte, so its bytes lie in memory as R, G, B, X
_NO_PALETTE = np.zeros(256, _PIXEL)
_BACKGROUND = np.array([*BACKGROUND_RGB, 0], np.uint8).view(_PIXEL)[0]
# The most bytes that streaming holds per pixel of the logical screen: the screen (4), what "restore to previous"
# saves of it (4), a frame's colour indices (1), a transparent frame's opacity mask (1) and colour lookup (4), and for
# a frame whose LZW data stops early a second decode of its indices and two masks (3).
STREAM_BYTES_PER_SCREEN_PIXEL = 17
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
    and keep what one decode holds within 512 MiB of memory.
    """

    # Area of the logical screen, and of the screen grown to enclose every frame's rectangle ("decompression bomb").
    max_canvas_pixels: int = 4096 * 4096
    max_frames: int = 10_000  # "too many frames"
    # The most memory one decode may hold ("too large"): for `decode`, its uint8 [N, H, W, 3] array; for a streaming
    # caller, what it keeps plus `stream_bytes` (pipeline/clip_frames.py).
    max_decoded_bytes: int = 512 << 20


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


def parse(data: bytes, limits: DecodeLimits = DecodeLimits()) -> Animation:
    """Reads a GIF's structure and timing, checked against `limits`; no pixel is decoded. Raises GifError."""
    width, height, frames = _parse(data, limits)
    return Animation(data, width, height, tuple(frames))


def decode(data: bytes, limits: DecodeLimits = DecodeLimits()) -> DecodedGif:
    """Decodes every frame of a GIF, composited as a viewer shows it. Raises GifError for anything undecodable."""
    animation = parse(data, limits)
    count, width, height = len(animation), animation.width, animation.height
    if count * height * width * 3 > limits.max_decoded_bytes:
        raise GifError(
            "too large", f"{count} frames of {width}x{height} exceed {limits.max_decoded_bytes} decoded bytes"
        )
    frames = np.empty((count, height, width, 3), np.uint8)
    for i, screen in animation.screens():
        frames[i] = screen[..., :3]
    return DecodedGif(frames=frames, durations_ms=animation.durations_ms)


def stream_bytes(width: int, height: int) -> int:
    """The most memory `Animation.screens` holds at once for a width x height logical screen, whatever the frames."""
    return width * height * STREAM_BYTES_PER_SCREEN_PIXEL


class Animation:
    """A parsed GIF: its logical screen, each frame's timing and where its pixels lie in the file. `screens` decodes."""

    def __init__(self, data: bytes, width: int, height: int, frames: tuple[_Frame, ...]) -> None:
        self._data = data
        self._frames = frames
        self.width = width
        self.height = height
        # int32 [N]: how long each frame is shown, after the browser rule for short delays.
        self.durations_ms = browser_durations_ms(np.array([f.delay_cs for f in frames], np.int32) * 10)

    def __len__(self) -> int:
        return len(self._frames)

    def screens(self, indices: Iterable[int] | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Yields (i, the logical screen as shown while frame i is on) for each i of `indices` (increasing; default:
        every frame), the screen as read-only uint8 [H, W, 4] RGBX (see the module doc).

        Every step yields the same buffer, redrawn in place by the next one: a caller copies what it keeps. Frames
        are drawn in order, each disposed of as it asks before the next is drawn, except that drawing restarts from
        the latest frame that replaces the whole screen (see `_replaces_screen`) before the next frame asked for:
        the frames before it cannot show through, so their pixels are never decoded.
        """
        data, width, height = memoryview(self._data), self.width, self.height
        pixels = np.full((height, width), _BACKGROUND, _PIXEL)
        shown = pixels.view(np.uint8).reshape(height, width, 4)
        shown.flags.writeable = False
        keys = [i for i, frame in enumerate(self._frames) if _replaces_screen(frame, width, height)]
        position = 0  # `pixels` holds the screen as it is just before frame `position` is drawn
        for target in range(len(self)) if indices is None else indices:
            if not position <= target < len(self):
                raise ValueError(
                    f"frames must be asked for in increasing order from 0 to {len(self) - 1}: {target} came after"
                    f" {position - 1}"
                )
            decoded = self._latest_complete_key(data, keys, position, target)
            if decoded is not None:
                position, decoded = decoded
            for i in range(position, target + 1):
                frame = self._frames[i]
                # The part of the frame's rectangle that lies on the screen.
                x0, y0 = min(frame.left, width), min(frame.top, height)
                x1, y1 = min(frame.left + frame.width, width), min(frame.top + frame.height, height)
                region = pixels[y0:y1, x0:x1]
                saved = region.copy() if frame.disposal == _DISPOSE_PREVIOUS else None
                _paint(region, frame, *(decoded or _decode_indices(data, frame)))
                decoded = None
                if i == target:
                    yield i, shown
                if frame.disposal == _DISPOSE_BACKGROUND:
                    region[...] = _BACKGROUND
                elif saved is not None:
                    region[...] = saved
            position = target + 1

    def _latest_complete_key(
        self, data: memoryview, keys: list[int], position: int, target: int
    ) -> tuple[int, tuple[np.ndarray, None]] | None:
        """The latest frame after `position` and up to `target` that replaces the whole screen, with its decoded
        indices; None when there is none. A candidate whose LZW data stops early leaves pixels unpainted, through which
        the frames before it show, so the one before it is tried (such frames are rare)."""
        for key in reversed(keys[bisect.bisect_right(keys, position) : bisect.bisect_right(keys, target)]):
            indices, painted = _decode_indices(data, self._frames[key])
            if painted is None:
                return key, (indices, None)
        return None


def _replaces_screen(frame: _Frame, width: int, height: int) -> bool:
    """Whether the frame, when its LZW data is complete, leaves nothing of the screen before it visible, during or
    after it: it covers the screen, has no transparent colour, and does not ask to restore the screen before it."""
    return (
        frame.left == frame.top == 0
        and frame.width >= width
        and frame.height >= height
        and frame.transparent_index is None
        and frame.disposal != _DISPOSE_PREVIOUS
    )


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
        padded = np.zeros((256, 4), np.uint8)
        padded[:size, :3] = table
        padded[size:, :3] = table[0]
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


def _decode_indices(data: memoryview, frame: _Frame) -> tuple[np.ndarray, np.ndarray | None]:
    """Colour indices uint8 [h, w] of one frame, and which of them its LZW data covers (None: all)."""
    lzw, args = data[frame.lzw], (frame.min_code_size, frame.interlaced, -1)
    # Pillow's decoder writes straight into the numpy array (an "L" image mapped onto its memory).
    indices = np.zeros((frame.height, frame.width), np.uint8)
    try:
        _as_image(indices).frombytes(lzw, "gif", *args)
        return indices, None
    except ValueError:  # the LZW data stopped before the last pixel or turned invalid: Pillow keeps what it wrote
        pass
    # Which pixels were written shows by decoding again onto another fill value: a written pixel has the same value
    # in both arrays, an unwritten one is 0 in the first and 255 in the second.
    other = np.full_like(indices, 255)
    with contextlib.suppress(ValueError):
        _as_image(other).frombytes(lzw, "gif", *args)
    return indices, indices == other


def _as_image(indices: np.ndarray) -> Image.Image:
    height, width = indices.shape
    return Image.frombuffer("L", (width, height), indices, "raw", "L", 0, 1)


def _paint(region: np.ndarray, frame: _Frame, indices: np.ndarray, painted: np.ndarray | None) -> None:
    """Paints a frame's decoded pixels (`_decode_indices`) onto `region`, the part of the screen under its rectangle,
    leaving its transparent and undecoded pixels as they were."""
    height, width = region.shape
    indices = indices[:height, :width]
    if painted is not None:
        painted = painted[:height, :width]
    if frame.transparent_index is not None:
        opaque = indices != frame.transparent_index
        painted = opaque if painted is None else painted & opaque
    # Indices are bytes and palettes have 256 entries, so no index is out of range ("wrap" skips numpy's check).
    if painted is None:
        np.take(frame.palette, indices, out=region, mode="wrap")
    else:
        np.copyto(region, np.take(frame.palette, indices, mode="wrap"), where=painted)
