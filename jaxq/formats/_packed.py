"""Behaviour shared by the nibble-packed array types (packed uint8 [..., N, K/2], low nibble = even k)."""

from jaxq.formats.elements import unpack_nibbles


class Packed4:
    """Mixin for pytree dataclasses with a `packed` field holding two 4-bit codes per byte along K."""

    @property
    def shape(self):
        """The logical (unpacked) shape [..., N, K]."""
        return (*self.packed.shape[:-1], 2 * self.packed.shape[-1])

    def codes(self):
        """The 4-bit codes, uint8 [..., N, K]."""
        return unpack_nibbles(self.packed)
