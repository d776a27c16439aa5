"""The GIF decoder: ImageMagick's view of Pillow's collection of awkward GIFs and of real animations from Debian's
documentation, and GIFs built here byte by byte."""

import dataclasses
import io
import os
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import clip_frames, gif

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared" / "corpus" / "pillow-gifs"
# The images of Debian's wand-doc package (real animations among them), unpacked there by .ci/run.
DEBIAN_GIFS = REPO / ".cache" / "debian" / "wand-doc" / "usr" / "share" / "doc" / "wand-doc" / "html" / "_images"


def _reference_files() -> list:
    params = []
    for folder, missing in (
        (CORPUS, f"no corpus at {CORPUS}"),
        (DEBIAN_GIFS, f"Debian's wand-doc images are not at {DEBIAN_GIFS}: bash .ci/run fetches them"),
    ):
        paths = sorted(folder.glob("*.gif"))
        params += [pytest.param(path, id=f"{folder.name}/{path.name}") for path in paths] or [
            pytest.param(None, id=folder.name, marks=pytest.mark.skip(missing))
        ]
    return params


# Files that must fail, with the reason. Every other corpus file must decode exactly as ImageMagick coalesces it.
# (Where ImageMagick and browsers part ways the decoder follows browsers, and no corpus file goes there: ImageMagick
# shows the background colour index, opaque, where no frame has painted if the first frame has no transparency, and
# rejects a file whose LZW data ends early; both cases are tested on built GIFs below.)
EXPECTED_ERRORS = {
    "zero_width.gif": "zero-size canvas",  # a 0 x 32 logical screen
    # A 65535 x 1321 frame placed at y = 65280 on a 32 x 32 screen (and the file ends inside it).
    "decompression_bomb.gif": "decompression bomb",
    # Its second frame, 100 x 100, sits at (65535, 65535) on a 100 x 100 screen: a decoder that grows the screen to
    # hold every frame (Pillow) would allocate 4.3 Gpx. Clipping would defuse it (ImageMagick renders it), but a
    # file built like this is an attack, not an animation, and its reason should say so.
    "decompression_bomb_extents.gif": "decompression bomb",
}


def _imagemagick() -> tuple[list[str], list[str]] | None:
    """Commands for ImageMagick's convert and identify. A `convert` on PATH can be some other program, so each
    candidate must introduce itself as ImageMagick."""
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        magick, convert, identify = (os.path.join(directory, name) for name in ("magick", "convert", "identify"))
        if os.access(magick, os.X_OK):
            candidate = ([magick], [magick, "identify"])
        elif os.access(convert, os.X_OK) and os.access(identify, os.X_OK):
            candidate = ([convert], [identify])
        else:
            continue
        version = subprocess.run([*candidate[0], "-version"], capture_output=True, text=True, check=False).stdout
        if version.startswith("Version: ImageMagick"):
            return candidate
    return None


IMAGEMAGICK = _imagemagick()


@pytest.mark.parametrize("path", _reference_files())
def test_real_file_matches_imagemagick(path, tmp_path):
    data = path.read_bytes()
    if path.name in EXPECTED_ERRORS:
        with pytest.raises(gif.GifError) as info:
            gif.decode(data)
        assert info.value.reason == EXPECTED_ERRORS[path.name]
        return
    if IMAGEMAGICK is None:
        pytest.skip("ImageMagick is not installed (Debian package imagemagick); it is the reference decoder")
    convert, identify = IMAGEMAGICK
    subprocess.run([*convert, path, "-coalesce", tmp_path / "frame-%03d.png"], check=True, capture_output=True)
    reference = []
    for png in sorted(tmp_path.glob("frame-*.png")):
        rgba = np.asarray(Image.open(png).convert("RGBA"))
        assert np.isin(rgba[..., 3], (0, 255)).all(), "GIF transparency is all or nothing"
        reference.append(np.where(rgba[..., 3:] == 255, rgba[..., :3], np.array(gif.BACKGROUND_RGB, np.uint8)))
    delays_cs = subprocess.run(
        [*identify, "-format", "%T\n", path], check=True, capture_output=True, text=True
    ).stdout.split()

    decoded = gif.decode(data)

    assert len(decoded.frames) == len(reference)
    for i, (ours, theirs) in enumerate(zip(decoded.frames, reference, strict=True)):
        assert ours.shape == theirs.shape, f"frame {i}"
        assert np.array_equal(ours, theirs), f"frame {i}: {np.any(ours != theirs, axis=-1).sum()} pixels differ"
    expected_ms = gif.browser_durations_ms(np.array([int(d) * 10 for d in delays_cs]))
    np.testing.assert_array_equal(decoded.durations_ms, expected_ms)
    assert decoded.durations_ms.dtype == np.int32
    # Streaming a few of the frames, as the preprocessing job does, skips what they do not depend on.
    some = sorted({*range(len(reference) - 1, 0, -7), len(reference) - 1})
    for i, screen in gif.parse(data).screens(some):
        assert np.array_equal(screen[..., :3], reference[i]), f"frame {i} streamed alone"


# GIFs written byte by byte, so that every field is what the test says.

RED, GREEN, BLUE, BLACK = (200, 0, 0), (0, 200, 0), (0, 0, 200), (0, 0, 0)
PALETTE = [RED, GREEN, BLUE, BLACK]
WHITE = gif.BACKGROUND_RGB


@dataclass
class Frame:
    indices: list[list[int]]
    left: int = 0
    top: int = 0
    delay_cs: int = 10
    disposal: int = 0
    transparent: int | None = None
    palette: list[tuple[int, int, int]] | None = None
    control: bool = True  # write a graphic control extension


def _lzw(indices: np.ndarray, min_code_size: int = 8) -> bytes:
    """An LZW stream of literal codes only, with a clear code before the code size would grow: valid, simple."""
    clear = 1 << min_code_size
    codes, since_clear = [clear], 0
    for value in indices.ravel().tolist():
        if since_clear == clear - 2:
            codes.append(clear)
            since_clear = 0
        codes.append(value)
        since_clear += 1
    codes.append(clear + 1)
    packed = sum(code << (i * (min_code_size + 1)) for i, code in enumerate(codes))
    stream = packed.to_bytes((len(codes) * (min_code_size + 1) + 7) // 8, "little")
    blocks = b"".join(bytes([len(stream[i : i + 255])]) + stream[i : i + 255] for i in range(0, len(stream), 255))
    return bytes([min_code_size]) + blocks + b"\x00"


def _table(colours: list[tuple[int, int, int]]) -> tuple[int, bytes]:
    size_field = max(0, (len(colours) - 1).bit_length() - 1)
    colours = colours + [(0, 0, 0)] * (2 ** (size_field + 1) - len(colours))
    return size_field, bytes(channel for colour in colours for channel in colour)


def _gif(width: int, height: int, frames: list[Frame], palette=PALETTE, background: int = 0) -> bytes:
    out = bytearray(b"GIF89a" + struct.pack("<HH", width, height))
    if palette is None:
        out += bytes([0x70, background, 0])
    else:
        size_field, table = _table(palette)
        out += bytes([0xF0 | size_field, background, 0]) + table
    for frame in frames:
        indices = np.array(frame.indices, np.uint8)
        if frame.control:
            packed = frame.disposal << 2 | (frame.transparent is not None)
            out += b"\x21\xf9\x04" + struct.pack("<BHB", packed, frame.delay_cs, frame.transparent or 0) + b"\x00"
        flags, table = 0, b""
        if frame.palette is not None:
            size_field, table = _table(frame.palette)
            flags = 0x80 | size_field
        out += b"\x2c" + struct.pack("<4HB", frame.left, frame.top, indices.shape[1], indices.shape[0], flags) + table
        out += _lzw(indices)
    return bytes(out + b"\x3b")


def _pixels(decoded: gif.DecodedGif) -> list[list[tuple[int, ...]]]:
    """Each frame's pixels in row-major order, as RGB tuples."""
    return [[tuple(p) for p in frame.reshape(-1, 3).tolist()] for frame in decoded.frames]


def test_dispose_none_keeps_and_background_clears_to_the_fixed_colour():
    data = _gif(
        3,
        1,
        [Frame([[0, 0, 0]]), Frame([[1]], left=1, disposal=1), Frame([[2]], left=2, disposal=2), Frame([[3]])],
        background=3,  # black: ignored, "restore to background" clears to transparent
    )
    assert _pixels(gif.decode(data)) == [
        [RED, RED, RED],
        [RED, GREEN, RED],
        [RED, GREEN, BLUE],
        [BLACK, GREEN, WHITE],
    ]


def test_dispose_previous_restores_what_was_under_the_frame():
    data = _gif(2, 1, [Frame([[0, 0]]), Frame([[1]], disposal=3), Frame([[2]], left=1)])
    assert _pixels(gif.decode(data)) == [[RED, RED], [GREEN, RED], [RED, BLUE]]


def test_dispose_previous_on_the_first_frame_restores_the_empty_screen():
    data = _gif(2, 1, [Frame([[0, 1]], disposal=3), Frame([[2]], left=1)])
    assert _pixels(gif.decode(data)) == [[RED, GREEN], [WHITE, BLUE]]


def test_transparency_is_per_frame():
    data = _gif(
        3,
        1,
        [
            Frame([[0, 1, 2]], transparent=1),
            Frame([[2, 2, 0]], transparent=2),
            Frame([[3, 1, 3]], transparent=1, delay_cs=50),
            Frame([[1, 1, 1]], control=False),  # a graphic control block applies to the next image only
        ],
    )
    decoded = gif.decode(data)
    assert _pixels(decoded) == [[RED, WHITE, BLUE], [RED, WHITE, RED], [BLACK, WHITE, BLACK], [GREEN] * 3]
    np.testing.assert_array_equal(decoded.durations_ms, [100, 100, 500, 100])  # no delay for the last: 0 -> 100


def test_delays_of_0_and_10_ms_become_100_ms():
    frames = [Frame([[0]], delay_cs=delay) for delay in (0, 1, 2, 7, 100)]
    decoded = gif.decode(_gif(1, 1, frames))
    np.testing.assert_array_equal(decoded.durations_ms, [100, 100, 20, 70, 1000])
    assert decoded.durations_ms.dtype == np.int32


def test_frames_are_clipped_to_the_screen():
    data = _gif(3, 2, [Frame([[0, 0, 0], [0, 0, 0]]), Frame([[1, 2], [2, 1]], left=2, top=1)])
    assert _pixels(gif.decode(data))[1] == [RED, RED, RED, RED, RED, GREEN]


def test_a_small_first_frame_leaves_the_rest_transparent():
    assert _pixels(gif.decode(_gif(2, 2, [Frame([[2]], left=1, top=1)]))) == [[WHITE, WHITE, WHITE, BLUE]]


def test_local_colour_table_overrides_the_global_one_for_its_frame_only():
    data = _gif(2, 1, [Frame([[0, 1]], palette=[BLUE, BLACK]), Frame([[1]], left=1)])
    assert _pixels(gif.decode(data)) == [[BLUE, BLACK], [BLUE, GREEN]]


def test_missing_colour_table_draws_black_and_out_of_table_indices_take_the_first_colour():
    assert _pixels(gif.decode(_gif(2, 1, [Frame([[0, 5]])], palette=None))) == [[BLACK, BLACK]]
    assert _pixels(gif.decode(_gif(3, 1, [Frame([[1, 2, 9]])], palette=[RED, GREEN]))) == [[GREEN, RED, RED]]


def test_lzw_data_ending_early_paints_only_what_it_holds():
    data = bytearray(_gif(3, 2, [Frame([[0, 0, 0], [0, 0, 0]]), Frame([[1, 1, 1], [1, 1, 1]])]))
    full, short = _lzw(np.ones((2, 3), np.uint8)), _lzw(np.ones((1, 4), np.uint8))
    start = data.rindex(full)
    data[start : start + len(full)] = short
    assert _pixels(gif.decode(bytes(data)))[1] == [GREEN] * 4 + [RED] * 2


def test_stray_bytes_between_blocks_are_skipped():
    data = _gif(1, 1, [Frame([[0]]), Frame([[1]])])
    second = data.rindex(b"\x21\xf9")
    data = data[:second] + b"GIF89a\x00\x00" + data[second:]
    assert _pixels(gif.decode(data)) == [[RED], [GREEN]]


def _pillow_animation(disposal: int) -> tuple[bytes, np.ndarray]:
    """A 40 x 24 animation saved by Pillow, which writes later frames as the rectangles that changed, and the
    frames it was made from as RGB."""
    rng = np.random.default_rng(disposal)
    palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
    backdrop = rng.integers(0, 8, (24, 40), dtype=np.uint8)
    indices = []
    for i in range(5):
        frame = backdrop.copy()
        frame[5:15, 3 + 4 * i : 13 + 4 * i] = 9 + i
        indices.append(frame)
    images = []
    for frame in indices:
        image = Image.fromarray(frame, "P")
        image.putpalette(palette.tobytes())
        images.append(image)
    buffer = io.BytesIO()
    images[0].save(
        buffer, "GIF", save_all=True, append_images=images[1:], duration=[0, 10, 20, 30, 40], disposal=disposal
    )
    return buffer.getvalue(), palette[np.stack(indices)]


@pytest.mark.parametrize("disposal", [1, 2])
def test_pillow_animation_round_trips(disposal):
    data, expected = _pillow_animation(disposal)
    decoded = gif.decode(data)
    np.testing.assert_array_equal(decoded.frames, expected)
    np.testing.assert_array_equal(decoded.durations_ms, [100, 100, 20, 30, 40])


def test_interlaced_frame():
    indices = np.random.default_rng(0).integers(0, 256, (23, 17), dtype=np.uint8)
    image = Image.fromarray(indices, "P")
    image.putpalette(np.arange(768, dtype=np.uint8).tobytes())
    buffer = io.BytesIO()
    image.save(buffer, "GIF", interlace=True)
    assert Image.open(buffer).tile[0].args[1], "Pillow wrote the frame interlaced"
    decoded = gif.decode(buffer.getvalue())
    palette = np.arange(768).reshape(256, 3) % 256
    np.testing.assert_array_equal(decoded.frames[0], palette[indices])


def test_truncated_files_fail():
    data, _ = _pillow_animation(1)
    for end in (8, 12, 14, 400, len(data) // 2, len(data) - 3):
        with pytest.raises(gif.GifError) as info:
            gif.decode(data[:end])
        assert info.value.reason == "truncated", end


def test_a_missing_trailer_is_not_truncation():
    data, expected = _pillow_animation(1)
    assert data[-1:] == b"\x3b"
    np.testing.assert_array_equal(gif.decode(data[:-1]).frames, expected)


def test_not_a_gif():
    png = io.BytesIO()
    Image.new("RGB", (4, 4)).save(png, "PNG")
    for data in (png.getvalue(), b"", b"GIF8", b"GIF90a" + bytes(20)):
        assert not gif.is_gif(data)
        with pytest.raises(gif.GifError) as info:
            gif.decode(data)
        assert info.value.reason == "not a gif"
        assert isinstance(info.value, ValueError)
    assert gif.is_gif(_gif(1, 1, [Frame([[0]])]))


def test_a_file_without_images():
    with pytest.raises(gif.GifError) as info:
        gif.decode(_gif(4, 4, []))
    assert info.value.reason == "no frames"


def test_limits():
    data = _gif(4, 3, [Frame([[0]]) for _ in range(5)])
    assert len(gif.decode(data, gif.DecodeLimits(max_canvas_pixels=12, max_frames=5, max_decoded_bytes=180)).frames)
    cases = [
        (gif.DecodeLimits(max_canvas_pixels=11), "decompression bomb"),
        (gif.DecodeLimits(max_frames=4), "too many frames"),
        (gif.DecodeLimits(max_decoded_bytes=179), "too large"),
    ]
    for limits, reason in cases:
        with pytest.raises(gif.GifError) as info:
            gif.decode(data, limits)
        assert info.value.reason == reason
    with pytest.raises(gif.GifError) as info:
        gif.decode(_gif(4, 3, [Frame([[0]], left=3, top=3)]), gif.DecodeLimits(max_canvas_pixels=12))
    assert info.value.reason == "decompression bomb"  # the frame reaches out to 4 x 4


def test_streaming_restarts_at_the_latest_frame_that_covers_the_screen_whole():
    full = [[2, 2, 2], [2, 2, 2]]
    data = bytearray(
        _gif(
            3,
            2,
            [
                Frame([[0, 0, 0], [0, 0, 0]]),
                Frame([[1]], left=1),
                Frame(full),  # covers the screen: nothing drawn before it can show
                Frame([[3]], left=2, top=1),
                Frame(full, disposal=3),  # covers it, but restores what was under it afterwards
                Frame([[0]]),
                Frame(full, transparent=3),  # covers it, but could let pixels through
                Frame([[1]]),
            ],
        )
    )
    decoded = gif.decode(bytes(data))
    animation = gif.parse(bytes(data))
    for wanted in ([3], [5], [7], [1, 3, 7], [0, 2, 4, 6]):
        streamed = {i: screen[..., :3].copy() for i, screen in animation.screens(wanted)}
        assert list(streamed) == wanted
        for i, screen in streamed.items():
            np.testing.assert_array_equal(screen, decoded.frames[i], err_msg=f"frame {i} of {wanted}")
    with pytest.raises(ValueError, match="increasing order"):
        list(animation.screens([3, 2]))

    # The covering frame's LZW data stops after 4 pixels: the 2 it leaves unpainted show the frames before it.
    start = data.index(_lzw(np.array(full, np.uint8)))
    data[start : start + len(_lzw(np.array(full, np.uint8)))] = _lzw(np.full((1, 4), 2, np.uint8))
    ((_, screen),) = gif.parse(bytes(data)).screens([3])
    assert [tuple(p) for p in screen[..., :3].reshape(-1, 3).tolist()] == [BLUE, BLUE, BLUE, BLUE, RED, BLACK]


# Streaming, as the preprocessing job decodes (pipeline/clip_frames.py): memory and its budget.

_PEAK_MEMORY = """
import sys
from pipeline import gif
from pipeline.clip_frames import ClipSpec, clip_frames

def kib(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))

def peak_above_now(fn):
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # Linux: the peak resident size (VmHWM) starts again from the current one
    now = kib("VmRSS")
    fn()
    return (kib("VmHWM") - now) * 1024

spec = ClipSpec(num_frames=16, size=64, fps=None)
small, long = (open(path, "rb").read() for path in sys.argv[1:])
clip_frames(small, spec)  # lazy imports and first-use buffers, before measuring
print(peak_above_now(lambda: clip_frames(long, spec)), peak_above_now(lambda: gif.decode(long)))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="measures peak memory through Linux's /proc")
def test_streaming_holds_one_screen_whatever_the_frame_count(tmp_path):
    # 400 frames on a 640 x 480 screen (a small square hopping about): 369 MB as one array of every frame.
    frames = [Frame(np.full((16, 16), 1 + i % 3).tolist(), (i * 37) % 624, (i * 23) % 464, 4) for i in range(400)]
    (tmp_path / "long.gif").write_bytes(_gif(640, 480, frames))
    (tmp_path / "small.gif").write_bytes(_gif(8, 8, frames[:2]))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = [sys.executable, "-c", _PEAK_MEMORY, tmp_path / "small.gif", tmp_path / "long.gif"]
    streamed, whole = map(int, subprocess.run(args, env=env, capture_output=True, text=True, check=True).stdout.split())

    assert whole >= 400 * 640 * 480 * 3  # the measurement sees what a decode holds
    assert streamed <= clip_frames.held_bytes(640, 480, clip_frames.ClipSpec(num_frames=16, size=64, fps=None))
    print(f"peak memory above the start: streamed {streamed / 2**20:.1f} MiB, every frame {whole / 2**20:.1f} MiB")


def test_a_gif_over_the_memory_budget_is_refused():
    data = _gif(40, 30, [Frame([[i % 4]], left=i, delay_cs=5) for i in range(12)])
    spec = clip_frames.ClipSpec(num_frames=4, size=8, fps=None)
    held = clip_frames.held_bytes(40, 30, spec)
    assert held == 40 * 30 * gif.STREAM_BYTES_PER_SCREEN_PIXEL + 4 * 8 * 8 * 3
    frames, _ = clip_frames.clip_frames(
        data, dataclasses.replace(spec, limits=gif.DecodeLimits(max_decoded_bytes=held))
    )
    assert frames.shape == (4, 8, 8, 3)
    with pytest.raises(clip_frames.ClipError) as info:
        clip_frames.clip_frames(data, dataclasses.replace(spec, limits=gif.DecodeLimits(max_decoded_bytes=held - 1)))
    assert (info.value.stage, info.value.reason) == ("decode", "too large")
    assert "over the budget" in info.value.detail
