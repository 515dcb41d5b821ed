"""How an image divides into chunks: the one copy of the arithmetic.

An image of `image_size` bytes in chunks of `chunk_size` has
ceil(image_size / chunk_size) chunks; every chunk is `chunk_size` long but
the last, which holds the rest. Agent, broker, storage node and restore all
ask this object, so they can never disagree about a length.
"""

from __future__ import annotations

from dataclasses import dataclass

from bus.errors import RequestError


def chunk_count_for(image_size: int, chunk_size: int) -> int:
    return (image_size + chunk_size - 1) // chunk_size


@dataclass(frozen=True, slots=True)
class ImageGeometry:
    image_size: int
    chunk_size: int

    @property
    def chunk_count(self) -> int:
        return chunk_count_for(self.image_size, self.chunk_size)

    def chunk_len(self, index: int) -> int:
        """Length of chunk `index` (0 outside the image)."""
        if index < 0:
            return 0
        return max(0, min(self.chunk_size, self.image_size - index * self.chunk_size))

    def offset(self, index: int) -> int:
        return index * self.chunk_size

    def slice_len(self, start: int, count: int) -> int:
        """Bytes covered by chunks [start, start + count), clipped to the image."""
        end = min(start + count, self.chunk_count)
        if end <= start:
            return 0
        return min(self.image_size, end * self.chunk_size) - start * self.chunk_size

    def validate(self, chunk_count: int) -> None:
        """Refuse a peer's chunk count that does not match the image (bad_field)."""
        if chunk_count != self.chunk_count:
            raise RequestError(f"{chunk_count} chunks do not cover {self.image_size} bytes at {self.chunk_size}",
                               "bad_field")
