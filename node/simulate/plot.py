"""The swarm's throughput over time, one line per rule: as a PNG (written with zlib and struct, no
plotting library) and as text for the terminal. The y axis is the share of the ideal, 0 to 1, with a
grid line every 0.25; the x axis is simulated time, a tick every hour."""

from __future__ import annotations

import struct
import zlib
from typing import Sequence

COLORS = {"node": (31, 119, 180), "petals": (255, 127, 14), "mixed": (44, 160, 44)}
MARKS = {"node": "n", "petals": "p", "mixed": "m"}


class Canvas:
    def __init__(self, width: int, height: int):
        self.width, self.height = width, height
        self.pixels = bytearray(b"\xff" * (width * height * 3))

    def dot(self, x: int, y: int, color) -> None:
        if 0 <= x < self.width and 0 <= y < self.height:
            i = (y * self.width + x) * 3
            self.pixels[i : i + 3] = bytes(color)

    def line(self, x0: int, y0: int, x1: int, y1: int, color) -> None:
        steps = max(abs(x1 - x0), abs(y1 - y0), 1)
        for k in range(steps + 1):
            self.dot(round(x0 + (x1 - x0) * k / steps), round(y0 + (y1 - y0) * k / steps), color)

    def box(self, x0: int, y0: int, x1: int, y1: int, color) -> None:
        for y in range(y0, y1):
            for x in range(x0, x1):
                self.dot(x, y, color)

    def png(self) -> bytes:
        rows = b"".join(
            b"\x00" + bytes(self.pixels[y * self.width * 3 : (y + 1) * self.width * 3]) for y in range(self.height)
        )

        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)
        return (
            b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b"")
        )


def png(series: dict[str, tuple[Sequence[float], Sequence[float]]], width: int = 720, height: int = 300) -> bytes:
    """series: {rule: (times in s, fractions)}; a legend of colored boxes at the top left, in the
    order node, petals, mixed (the caption names the colors)."""
    return panels([series], width, height)


def panels(stack: Sequence[dict], width: int = 720, height: int = 300) -> bytes:
    """One chart per series, stacked top to bottom, each `height` pixels high."""
    canvas = Canvas(width, height * len(stack))
    for k, series in enumerate(stack):
        _chart(canvas, series, k * height, height)
    return canvas.png()


def _chart(canvas: Canvas, series: dict, offset: int, height: int) -> None:
    left, right, top, bottom = 30, 10, offset + 10, 20
    plot_w, plot_h = canvas.width - left - right, height - 10 - bottom
    start, end = _span(series)
    grey, black = (210, 210, 210), (0, 0, 0)
    for q in (0.25, 0.5, 0.75, 1.0):
        y = top + round(plot_h * (1 - q))
        canvas.line(left, y, left + plot_w, y, grey)
    hour = 3600.0
    t = (start // hour + 1) * hour
    while t < end:
        x = left + round(plot_w * (t - start) / (end - start))
        canvas.line(x, top + plot_h, x, top + plot_h + 4, black)
        t += hour
    canvas.line(left, top, left, top + plot_h, black)
    canvas.line(left, top + plot_h, left + plot_w, top + plot_h, black)
    for rule, (times, values) in series.items():
        color = COLORS.get(rule, (0, 0, 0))
        points = [
            (left + round(plot_w * (t - start) / (end - start)), top + round(plot_h * (1 - min(max(v, 0.0), 1.0))))
            for t, v in zip(times, values)
        ]
        for (x0, y0), (x1, y1) in zip(points, points[1:]):
            canvas.line(x0, y0, x1, y1, color)
    for k, rule in enumerate(series):
        canvas.box(left + 8 + 18 * k, top + 4, left + 20 + 18 * k, top + 10, COLORS.get(rule, (0, 0, 0)))


def text(series: dict[str, tuple[Sequence[float], Sequence[float]]], width: int = 72, height: int = 12) -> str:
    """The same chart in characters: n node, p petals, m mixed (the last drawn wins a cell)."""
    start, end = _span(series)
    grid = [[" "] * width for _ in range(height)]
    for rule, (times, values) in series.items():
        for t, v in zip(times, values):
            x = min(width - 1, int(width * (t - start) / (end - start)))
            y = min(height - 1, int(height * (1 - min(max(v, 0.0), 1.0))))
            grid[y][x] = MARKS.get(rule, "*")
    lines = []
    for k, row in enumerate(grid):
        label = f"{1 - k / height:4.2f} |" if k % 3 == 0 else "     |"
        lines.append(label + "".join(row))
    lines.append("     +" + "-" * width)
    lines.append(f"      {start / 3600:.1f} h{' ' * (width - 14)}{end / 3600:.1f} h")
    legend = ", ".join(f"{MARKS.get(r, '*')} {r}" for r in series)
    return "\n".join(lines) + f"\n      swarm throughput / ideal ({legend})"


def _span(series) -> tuple[float, float]:
    times = [t for ts, _ in series.values() for t in ts]
    start, end = (min(times), max(times)) if times else (0.0, 1.0)
    return start, end if end > start else start + 1.0
