"""A run's loss curve: loss_log.jsonl (one line per optimizer step) and loss.png drawn with PIL.

    curve = append_loss_log(out / "loss_log.jsonl", result.first_step, result.losses)
    draw_loss_curve(curve, out / "loss.png")

A resumed run appends after the steps its checkpoint kept, so the log and the picture cover the
whole run. The picture shows every step's loss (thin, light) and its exponential moving average
(thick), with the loss range and the step range written on the axes; no plotting package needed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

Point = tuple[int, float]  # (step, loss)

SIZE = (640, 360)
MARGIN = (64, 24, 16, 40)  # left, top, right, bottom
SMOOTHING = 0.9


def append_loss_log(path: Path, first_step: int, losses: Sequence[float]) -> list[Point]:
    """Write one JSON line per step (earlier lines up to `first_step` kept); return the whole curve."""
    path.parent.mkdir(parents=True, exist_ok=True)
    kept: list[Point] = []
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                if record["step"] <= first_step:
                    kept.append((int(record["step"]), float(record["loss"])))
    curve = kept + [(first_step + i + 1, float(loss)) for i, loss in enumerate(losses)]
    path.write_text("".join(json.dumps({"step": step, "loss": loss}) + "\n" for step, loss in curve))
    return curve


def smoothed(values: Sequence[float], weight: float = SMOOTHING) -> list[float]:
    """Exponential moving average, debiased as TensorBoard's smoothing is."""
    average, out = 0.0, []
    for count, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight**count))
    return out


def draw_loss_curve(curve: Sequence[Point], path: Path, title: str = "training loss") -> Path:
    """A PNG of loss against step; needs at least one finite point."""
    points = [(step, loss) for step, loss in curve if math.isfinite(loss)]
    if not points:
        raise ValueError("no finite loss to draw")
    width, height = SIZE
    left, top, right, bottom = MARGIN
    image = Image.new("RGB", SIZE, "white")
    draw = ImageDraw.Draw(image)
    steps = [step for step, _ in points]
    losses = [loss for _, loss in points]
    low, high = min(losses), max(losses)
    if high == low:
        low, high = low - 0.5 * abs(low or 1), high + 0.5 * abs(high or 1)
    first, last = steps[0], max(steps[-1], steps[0] + 1)

    def xy(step: float, loss: float) -> tuple[float, float]:
        x = left + (step - first) / (last - first) * (width - left - right)
        y = top + (high - loss) / (high - low) * (height - top - bottom)
        return x, y

    draw.rectangle((left, top, width - right, height - bottom), outline=(160, 160, 160))
    if len(points) > 1:
        draw.line([xy(s, v) for s, v in points], fill=(170, 200, 235), width=1)
        draw.line([xy(s, v) for s, v in zip(steps, smoothed(losses))], fill=(20, 80, 170), width=3)
    else:
        x, y = xy(*points[0])
        draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=(20, 80, 170))
    draw.text((left, 4), f"{title} (step {first}-{steps[-1]}, last {losses[-1]:.4g})", fill="black")
    draw.text((4, top), f"{high:.3g}", fill="black")
    draw.text((4, height - bottom - 10), f"{low:.3g}", fill="black")
    draw.text((left, height - bottom + 6), str(first), fill="black")
    draw.text((width - right - 40, height - bottom + 6), str(steps[-1]), fill="black")
    draw.text(((width - 30) // 2, height - 16), "step", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
