"""The sympy symbols derived rules are written in. Names here are printer roles, not spec names:
spec gates enter as `gate_<name>` symbols (see `ir.gate_symbol`)."""
import sympy

e = sympy.Symbol("e", real=True)           # error of one output coordinate, y - v
a = sympy.Symbol("a", positive=True)       # |e| (or its smooth surrogate)
r = sympy.Symbol("r", positive=True)       # ||e||_2 over the value axis
y = sympy.Symbol("y", real=True)           # memory output M(k), one coordinate
v = sympy.Symbol("v", real=True)           # target value, one coordinate
w = sympy.Symbol("w", real=True)           # new state entry
w0 = sympy.Symbol("w0", real=True)         # previous state entry
z = sympy.Symbol("z", real=True)           # log of the new state entry (KL)
lw0 = sympy.Symbol("lw0", real=True)       # log of the previous state entry (KL)
s = sympy.Symbol("s", real=True)           # the algorithm's step for this entry (-lr * grad for GD)
lr = sympy.Symbol("lr", positive=True)     # the algorithm's learning rate (local strength eta)
sigma = sympy.Symbol("sigma", real=True)   # sign of the new entry (l1 branches)
lam = sympy.Symbol("lam", real=True)       # Lagrange multiplier of a mass constraint
n = sympy.Symbol("n", nonnegative=True)    # ||k||^2
y0 = sympy.Symbol("y0", real=True)         # previous state's output W0 k, one coordinate
A = sympy.Symbol("A", real=True)           # FTRL accumulator entry
N = sympy.Symbol("N", positive=True)       # a norm of the accumulator (mirror maps)
