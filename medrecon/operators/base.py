"""The linear-operator algebra every forward model is built from.

A :class:`LinearOperator` maps a batch of tensors of shape ``(B, *in_shape)`` to ``(B, *out_shape)``.
Entries of ``in_shape`` / ``out_shape`` may be ``None``: that axis takes any size and is carried
through (used for the channel axis of images).  Operators compose with ``@``, scale with ``*``,
add with ``+`` and give their adjoint as ``.H``; the adjoint of a composite is built from the
adjoints of its parts, so nobody writes it by hand.

A :class:`SamplingOperator` is a forward model with the decomposition of Song et al. (ICLR 2022),
``A = P(Λ)·Λ·T``: a full transform ``T``, a binary mask ``Λ`` of measured entries and the reduction
``P`` to those entries (``expand`` is its zero-filling inverse).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from medrecon.errors import ShapeError

__all__ = ["LinearOperator", "SamplingOperator", "Identity", "Diagonal"]

Shape = tuple[int | None, ...]


def _describe(t: Tensor) -> str:
    return f"shape {tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}"


def _fmt_shape(shape: Shape) -> str:
    return "(B, " + ", ".join("*" if s is None else str(s) for s in shape) + ")"


class LinearOperator:
    """A linear map between batched tensors, with its adjoint.

    Subclasses implement :meth:`_forward` and :meth:`_adjoint` (and may override
    :meth:`_normal`); the public :meth:`forward`, :meth:`adjoint` and :meth:`normal` check the
    input shape and dtype first.

    Parameters
    ----------
    in_shape, out_shape : tuple of int or None
        Shape of one batch item on each side; ``None`` marks an axis of any size that the
        operator carries through unchanged.
    in_complex, out_complex : bool
        Whether the domain / range are complex.  A complex side accepts real input too (it is
        promoted); a real side rejects complex input.
    name : str
        Used in error messages.
    """

    def __init__(
        self,
        in_shape: Sequence[int | None],
        out_shape: Sequence[int | None],
        *,
        in_complex: bool = False,
        out_complex: bool = False,
        name: str | None = None,
    ):
        self.in_shape: Shape = tuple(in_shape)
        self.out_shape: Shape = tuple(out_shape)
        self.in_complex = in_complex
        self.out_complex = out_complex
        self.name = name or type(self).__name__

    #: a real operator that also applies unchanged to complex tensors (masks, differences)
    complex_ok: bool = False

    # -- checks -------------------------------------------------------------------------------
    def _check(self, x: Tensor, shape: Shape, is_complex: bool, what: str) -> Tensor:
        if not isinstance(x, Tensor):
            raise ShapeError(f"{self.name}.{what}(): expected a torch.Tensor, got {type(x).__name__}")
        ok = x.ndim == len(shape) + 1 and all(
            s is None or s == d for s, d in zip(shape, x.shape[1:], strict=True)
        )
        if not ok:
            raise ShapeError(
                f"{self.name}.{what}(): expected shape {_fmt_shape(shape)}, got {_describe(x)}"
            )
        if x.is_complex() and not is_complex and not self.complex_ok:
            raise ShapeError(f"{self.name}.{what}(): expected a real floating tensor, got {_describe(x)}")
        if not (x.is_floating_point() or x.is_complex()):
            raise ShapeError(
                f"{self.name}.{what}(): expected a floating-point tensor, got {_describe(x)}"
            )
        if is_complex and not x.is_complex():
            x = x.to(torch.complex128 if x.dtype == torch.float64 else torch.complex64)
        return x

    # -- public API ---------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        """Apply the operator: ``(B, *in_shape) -> (B, *out_shape)``."""
        return self._forward(self._check(x, self.in_shape, self.in_complex, "forward"))

    def adjoint(self, y: Tensor) -> Tensor:
        """Apply the adjoint: ``(B, *out_shape) -> (B, *in_shape)``."""
        return self._adjoint(self._check(y, self.out_shape, self.out_complex, "adjoint"))

    def normal(self, x: Tensor) -> Tensor:
        """Apply ``Aᴴ A``."""
        return self._normal(self._check(x, self.in_shape, self.in_complex, "normal"))

    __call__ = forward

    @property
    def H(self) -> LinearOperator:  # noqa: N802 - the conventional name
        """The adjoint operator."""
        return _Adjoint(self)

    # -- to implement -------------------------------------------------------------------------
    def _forward(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _adjoint(self, y: Tensor) -> Tensor:
        raise NotImplementedError

    def _normal(self, x: Tensor) -> Tensor:
        return self._adjoint(self._forward(x))

    # -- algebra ------------------------------------------------------------------------------
    def __matmul__(self, other: LinearOperator) -> LinearOperator:
        if not isinstance(other, LinearOperator):
            return NotImplemented
        return _Composition(self, other)

    def __mul__(self, scale: float | complex) -> LinearOperator:
        if isinstance(scale, LinearOperator | Tensor):
            return NotImplemented
        return _Scaled(self, scale)

    __rmul__ = __mul__

    def __add__(self, other: LinearOperator) -> LinearOperator:
        if not isinstance(other, LinearOperator):
            return NotImplemented
        return _Sum(self, other)

    def __neg__(self) -> LinearOperator:
        return _Scaled(self, -1.0)

    def __sub__(self, other: LinearOperator) -> LinearOperator:
        return self + (-other)

    def __repr__(self) -> str:
        return f"{self.name}({_fmt_shape(self.in_shape)} -> {_fmt_shape(self.out_shape)})"


def _compatible(a: Shape, b: Shape) -> bool:
    return len(a) == len(b) and all(x is None or y is None or x == y for x, y in zip(a, b, strict=True))


def _carry(shape: Shape, other_side: Shape, neighbour: Shape) -> Shape:
    """Fill axes an operator carries through (``None`` on both sides) from its neighbour's shape."""
    if len(shape) != len(other_side) or len(shape) != len(neighbour):
        return shape
    return tuple(
        n if s is None and o is None else s for s, o, n in zip(shape, other_side, neighbour, strict=True)
    )


class _Adjoint(LinearOperator):
    def __init__(self, op: LinearOperator):
        super().__init__(
            op.out_shape, op.in_shape, in_complex=op.out_complex, out_complex=op.in_complex,
            name=f"{op.name}.H",
        )
        self.op = op

    def _forward(self, x: Tensor) -> Tensor:
        return self.op._adjoint(x)

    def _adjoint(self, y: Tensor) -> Tensor:
        return self.op._forward(y)

    @property
    def H(self) -> LinearOperator:  # noqa: N802
        return self.op


class _Composition(LinearOperator):
    """``(A @ B)(x) = A(B(x))``."""

    def __init__(self, a: LinearOperator, b: LinearOperator):
        if not _compatible(a.in_shape, b.out_shape):
            raise ShapeError(
                f"cannot compose {a.name} @ {b.name}: {a.name} takes {_fmt_shape(a.in_shape)} "
                f"but {b.name} gives {_fmt_shape(b.out_shape)}"
            )
        super().__init__(
            _carry(b.in_shape, b.out_shape, a.in_shape),
            _carry(a.out_shape, a.in_shape, b.out_shape),
            in_complex=b.in_complex or (b.complex_ok and a.in_complex),
            out_complex=a.out_complex,
            name=f"({a.name} @ {b.name})",
        )
        self.complex_ok = a.complex_ok and b.complex_ok
        self.a, self.b = a, b

    def _forward(self, x: Tensor) -> Tensor:
        return self.a.forward(self.b._forward(x))

    def _adjoint(self, y: Tensor) -> Tensor:
        return self.b.adjoint(self.a._adjoint(y))


class _Scaled(LinearOperator):
    def __init__(self, op: LinearOperator, scale: float | complex):
        is_c = isinstance(scale, complex)
        super().__init__(
            op.in_shape, op.out_shape, in_complex=op.in_complex or is_c,
            out_complex=op.out_complex or is_c, name=f"{scale}*{op.name}",
        )
        self.op, self.scale = op, scale

    def _forward(self, x: Tensor) -> Tensor:
        return self.scale * self.op._forward(x)

    def _adjoint(self, y: Tensor) -> Tensor:
        s = self.scale.conjugate() if isinstance(self.scale, complex) else self.scale
        return s * self.op._adjoint(y)

    def _normal(self, x: Tensor) -> Tensor:
        return abs(self.scale) ** 2 * self.op._normal(x)


class _Sum(LinearOperator):
    def __init__(self, a: LinearOperator, b: LinearOperator):
        if not (_compatible(a.in_shape, b.in_shape) and _compatible(a.out_shape, b.out_shape)):
            raise ShapeError(f"cannot add {a!r} and {b!r}: shapes differ")
        super().__init__(
            a.in_shape, a.out_shape, in_complex=a.in_complex or b.in_complex,
            out_complex=a.out_complex or b.out_complex, name=f"({a.name} + {b.name})",
        )
        self.a, self.b = a, b

    def _forward(self, x: Tensor) -> Tensor:
        return self.a.forward(x) + self.b.forward(x)

    def _adjoint(self, y: Tensor) -> Tensor:
        return self.a.adjoint(y) + self.b.adjoint(y)


class Identity(LinearOperator):
    """The identity on ``(B, *shape)``."""

    def __init__(self, shape: Sequence[int | None], *, is_complex: bool = False):
        super().__init__(shape, shape, in_complex=is_complex, out_complex=is_complex)
        self.complex_ok = True

    def _forward(self, x: Tensor) -> Tensor:
        return x

    _adjoint = _forward


class Diagonal(LinearOperator):
    """Element-wise multiplication by a fixed tensor (a mask, coil weights, ...).

    Parameters
    ----------
    weights : Tensor
        Broadcastable against ``(B, *shape)``; real or complex.  It is moved to the input's
        device and cast to its precision on each call.
    shape : tuple of int or None
        Shape of one batch item.
    """

    def __init__(self, weights: Tensor, shape: Sequence[int | None], *, is_complex: bool | None = None):
        c = weights.is_complex() if is_complex is None else is_complex
        super().__init__(shape, shape, in_complex=c, out_complex=c, name="Diagonal")
        self.complex_ok = True
        self.weights = weights

    def _w(self, x: Tensor) -> Tensor:
        return match_tensor(self.weights, x)

    def _forward(self, x: Tensor) -> Tensor:
        return self._w(x) * x

    def _adjoint(self, y: Tensor) -> Tensor:
        return self._w(y).conj() * y


def match_tensor(w: Tensor, like: Tensor) -> Tensor:
    """Return ``w`` on ``like``'s device, in ``like``'s precision (complex stays complex)."""
    real = like.real.dtype if like.is_complex() else like.dtype
    if w.is_complex():
        dtype = torch.complex128 if real == torch.float64 else torch.complex64
    elif w.dtype == torch.bool:
        dtype = real
    else:
        dtype = real
    return w.to(device=like.device, dtype=dtype)


class SamplingOperator(LinearOperator):
    """A forward model ``A = P(Λ)·Λ·T`` (Song et al., ICLR 2022).

    Subclasses provide the full transform ``T`` (a :class:`LinearOperator`), the boolean
    ``mask`` Λ over T's range, ``reduce`` (P: full transform space → measured entries),
    ``expand`` (P⁻¹: measured entries → zero-filled full space) and ``T_inverse``.

    :meth:`data_consistency` blends a measurement into an image,

        T⁻¹[λ Λ P⁻¹ ŷ + (1−λ) Λ T x + (I−Λ) T x]  =  x + λ · T⁻¹ P⁻¹ (ŷ − A x),

    computed the second way, so only measured entries are ever produced.
    """

    T: LinearOperator
    mask: Tensor

    def reduce(self, z: Tensor) -> Tensor:
        """P: keep the measured entries of a full-transform-space tensor."""
        raise NotImplementedError

    def expand(self, y: Tensor) -> Tensor:
        """P⁻¹: place measured entries in a zero-filled full-transform-space tensor."""
        raise NotImplementedError

    def T_inverse(self, z: Tensor) -> Tensor:  # noqa: N802 - the paper's name
        """T⁻¹ applied to a full-transform-space tensor."""
        raise NotImplementedError

    def _inverse_of_measured(self, r: Tensor) -> Tensor:
        """T⁻¹ P⁻¹ r; subclasses override it to avoid materialising the zero-filled space."""
        return self.T_inverse(self.expand(r))

    def data_consistency(
        self, x: Tensor, y_hat: Tensor, lam: float | Tensor = 1.0, *, exact: bool = False,
        cg_iters: int = 30,
    ) -> Tensor:
        """Blend the measurement ``y_hat`` into ``x`` with weight ``lam`` ∈ [0, 1].

        Parameters
        ----------
        x : Tensor, shape (B, *in_shape)
            Current image estimate.
        y_hat : Tensor, shape (B, *out_shape)
            Measurement (possibly noised to the current diffusion time).
        lam : float or Tensor broadcastable to x
            1 replaces the measured entries; 0 leaves ``x`` unchanged.
        exact : bool
            Use ``x + λ·Aᴴ(AAᴴ)⁻¹(ŷ − Ax)``, the minimum-norm correction, instead of T⁻¹.  It is
            solved with ``cg_iters`` conjugate-gradient steps on the normal equations (from a zero
            correction, so the iterates stay in the range of Aᴴ and the data residual falls
            monotonically).  Needed where T⁻¹P⁻¹ does not invert A on its range: CT (T⁻¹ is FBP)
            and multi-coil MRI (T Tᴴ ≠ I).  Ill-conditioned A (CT) gives a 10–100× residual
            reduction in a few tens of steps rather than machine precision.
        cg_iters : int
            CG steps for ``exact``.

        Returns
        -------
        Tensor, shape (B, *in_shape)
        """
        y_hat = self._check(y_hat, self.out_shape, self.out_complex, "data_consistency")
        r = y_hat - self.forward(x)
        if exact:
            from medrecon.linalg import conjugate_gradient

            upd = conjugate_gradient(self._normal, self._adjoint(r), iters=cg_iters, tol=1e-10)
        else:
            upd = self._inverse_of_measured(r)
        if not x.is_complex() and upd.is_complex():
            upd = upd.real
        return x + lam * upd
