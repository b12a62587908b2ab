"""Recording attention inside a module's own forward: its ``F.scaled_dot_product_attention`` calls (timm's
fused path) or the softmax it computes itself (timm modules with ``fused_attn=False``, transformers families
whose attention bypasses ``AttentionInterface``: Swinv2, PVT, Hiera, VitDet, BLIP, FLAVA, ...).

While a recorded module runs, a ``TorchFunctionMode`` sees each of its calls:

- ``F.scaled_dot_product_attention``: the callback gets the exact ``q`` and ``k`` it receives (after
  ``q_norm``/``k_norm`` and rotary embeddings), with the same ``scale`` and ``attn_mask``; MAD is then computed
  by flash-MAD, no attention map is ever made;
- torch's ``flex_attention`` (seen through the stand-in :mod:`.flex_call` puts in its place while the hooks are
  installed): the same callback, with the logits its ``score_mod`` and block mask make as an additive bias;
- a softmax over the last dimension of a tensor of rank 3 or more: these are the attention probabilities the
  module already made; the callback gets them as they are (read once by the fused ``mad`` op, never copied). A
  module whose family gives a view of its softmax (kornia's LoFTR ``FullAttention``: ``[N, L, S, H]``, over dim 2)
  reports that view, ``[..., Nq, Nk]``, of the softmax calls the view takes instead.

The calls themselves run unchanged, so the model's outputs do not change. The mode is entered and left by
forward hooks (the post hook with ``always_call=True``), so it is left even when the forward raises (and, after
a KeyboardInterrupt, which skips that hook, at the module's next forward or when the recording ends, and until
then it records nothing, since it checks that its module's forward still runs); when the module's forward
returns, ``done`` is told, so that a module making several calls (differential attention) is recorded as one
layer.
"""

from __future__ import annotations

import ast
import dis
import inspect
import re
import sys
import textwrap
import threading
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .flex_call import (
    FlexAttentionStandIn,
    first_query_looks_ahead,
    flex_attention,
    flex_logits,
    is_flex_attention,
    kept_keys,
    refuse_causal,
    unread_flex_refusal,
    without_autocast,
)
from .forward_owner import ModuleCall, current_module_call, module_call_live
from .module_index import is_known_library, is_users_class, named_module_list
from .placement import CAUSAL_ADVICE
from .transformers_capture import AttentionCallback, forward_source

__all__ = ["may_compute_attention", "multiplies_matrices", "names_softmax", "timm_attention_modules",
           "source_attention_modules", "ModuleAttentionHooks", "DoneCallback", "ProbabilitiesCallback",
           "ProbabilitiesView"]

# (qualified module name, module, completed): the module's forward ended, returning (completed) or raising.
DoneCallback = Callable[[str, nn.Module, bool], None]
# (qualified module name, attention probabilities [..., Nq, Nk]) for a module that computes its own softmax.
ProbabilitiesCallback = Callable[[str, torch.Tensor], None]
# (softmax result, its dim) -> the attention probabilities [..., Nq, Nk] as a view of it, or None for a softmax that
# is not the module's attention: for a module whose softmax runs over another dim than the last.
ProbabilitiesView = Callable[[torch.Tensor, int], "torch.Tensor | None"]
# The input projections of timm's self-attention: q, k, v at once (Attention, DiffAttention, WindowAttention,
# ...), q alone (EvaAttention, AttentionRope, PVT v2's Attention with q and kv), or q, k, v and the MLP's input at
# once (ParallelScalingBlock, the *_xp_* and vit_pwee_* blocks that compute attention without an attention
# submodule).
_SELF_ATTENTION_PROJECTIONS = ("qkv", "q_proj", "in_proj", "q")
_SOFTMAX_FUNCTIONS = (torch.softmax, F.softmax, torch.Tensor.softmax, torch.special.softmax)  # (special's: QA 412)
# What else normalises logits over a dim: a module whose forward ran one of these, or a softmax that is not its
# attention (over another dim than the last), and no attention vitmad read, attended in a form it does not read.
_NORMALISING = (torch.logsumexp, torch.Tensor.logsumexp, torch.log_softmax, F.log_softmax, torch.Tensor.log_softmax,
                torch.special.logsumexp, torch.special.log_softmax)
# A softmax by hand, exp(l - max) / sum (no layer, no warning, QA 426): an exp of rank 3 or more (or what keeps its
# shape from it: a mask filled in, a cast) divided by a normaliser over its last or second-last dim (a sum kept with
# its dim), or multiplied by the reciprocal of one. An exp alone is none (a state-space mixer's discretisation, QA
# 429, QA 430).
_EXP = (torch.exp, torch.Tensor.exp, torch.Tensor.exp_)
_DIVISIONS = (torch.div, torch.divide, torch.true_divide, torch.Tensor.div, torch.Tensor.divide,
              torch.Tensor.true_divide, torch.Tensor.__truediv__, torch.Tensor.div_, torch.Tensor.__itruediv__)
_MULTIPLICATIONS = (torch.mul, torch.multiply, torch.Tensor.mul, torch.Tensor.multiply, torch.Tensor.__mul__,
                    torch.Tensor.__rmul__, torch.Tensor.mul_, torch.Tensor.__imul__)
_RECIPROCALS = (torch.reciprocal, torch.Tensor.reciprocal, torch.Tensor.__rtruediv__)
# Functions after which an exp's values stay the exp's, in its shape: its mask filled in, a cast.
_KEEPING = (torch.Tensor.masked_fill, torch.masked_fill, torch.Tensor.float, torch.Tensor.double, torch.Tensor.half,
            torch.Tensor.bfloat16, torch.Tensor.to, torch.Tensor.type_as, torch.Tensor.contiguous, torch.Tensor.clone,
            torch.Tensor.clamp, torch.clamp, torch.Tensor.clamp_min, torch.Tensor.__add__, torch.add,
            torch.Tensor.add)  # (not a product: a state-space scan multiplies its exp by the state, then normalises)
_KEPT = 4  # the exps (and what keeps their values) of a forward looked for in a division: the latest few


def _normaliser_shape(shape: torch.Size) -> bool:
    """Whether ``shape`` may be a normaliser kept with its dim: rank 3 or more, size 1 in one of its last two dims."""
    return len(shape) >= 3 and (shape[-1] == 1 or shape[-2] == 1)


def _normalises(shape: torch.Size, other: torch.Size) -> bool:
    """Whether ``other`` is a normaliser of an exp of ``shape`` over its last or second-last dim (its sum kept with
    that dim: ``[..., N, 1]`` or ``[..., 1, M]``), not a gate over its whole shape."""
    if len(other) != len(shape) or len(shape) < 3:
        return False
    return any(other == (*shape[:dim], 1, *shape[dim + 1:]) for dim in (len(shape) - 1, len(shape) - 2))
# torch's own function (the builtin F's attribute is, unless replaced): a library or profiler that replaces
# F.scaled_dot_product_attention with a wrapper calling it still reaches the mode with this one (compared with F's
# attribute at call time, nothing was recorded), whether it did so before or after vitmad was imported.
_SDPA = getattr(torch._C._nn, "scaled_dot_product_attention", F.scaled_dot_product_attention)
# The higher-order op torch's flex_attention runs: a mode sees it only where dynamo traces the call (a compiled
# function or model, torch.compile(flex_attention), the eager call's own compiled wrapper where the function is
# reached through a binding the stand-in does not replace), never through the stand-in, which calls torch's function
# with the modes off. Seen, it is a flex_attention call whose q and k vitmad did not get.
_FLEX_HOP = getattr(torch.ops.higher_order, "flex_attention", None)


def timm_attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """timm's attention modules by qualified name: the modules with a ``fused_attn`` switch and an input
    projection of their own (``qkv``, ``q_proj``, ``in_proj`` or ``q``): ``Attention``, ``AttentionRope``,
    ``EvaAttention``, ``DiffAttention``, ``ParallelScalingBlock``, ``WindowAttention``, ...

    Modules nested in another such module are left to the outer one.
    """
    found = {}
    for name, module in named_module_list(model):
        if hasattr(module, "fused_attn") and any(isinstance(getattr(module, p, None), nn.Module)
                                                 for p in _SELF_ATTENTION_PROJECTIONS):
            if not any(name.startswith(outer + ".") for outer in found):
                found[name] = module
    return found


# Calls of the fused attention functions vitmad reads, as a forward's source spells them.
_FUSED_CALLS = ("scaled_dot_product_attention(", "flex_attention(")


def _calls_fused_attention(cls: type) -> bool:
    """Whether ``cls.forward`` itself calls the fused attention (by name, or a global bound to flex_attention)."""
    source = forward_source(cls)
    return any(call in source for call in _FUSED_CALLS) or _names_flex_attention(cls)


def _names_read(code) -> tuple[set[str], set[str]]:
    """``(globals, attributes)`` a code object reads (its nested functions' and comprehensions' too): a global is
    looked up in the function's module, an attribute never (``self.attn`` is no module-level ``attn``; QA 262)."""
    globals_, attributes = set(), set()
    for instruction in dis.get_instructions(code):
        if instruction.opname in ("LOAD_GLOBAL", "LOAD_NAME"):
            globals_.add(str(instruction.argval))
        elif instruction.opname in ("LOAD_ATTR", "LOAD_METHOD", "IMPORT_FROM"):
            # (an import inside the function: "from torch.nn.functional import scaled_dot_product_attention")
            attributes.add(str(instruction.argval))
    for const in code.co_consts:
        if inspect.iscode(const):
            inner = _names_read(const)
            globals_ |= inner[0]
            attributes |= inner[1]
    return globals_, attributes


_FUSED_NAMES = ("scaled_dot_product_attention", "flex_attention")
# What a softmax may be read as: the names, and the functions and class a global may be bound to.
_SOFTMAX_NAMES = ("softmax", "Softmax")
_SOFTMAX_VALUES = (torch.softmax, F.softmax, torch.special.softmax, nn.Softmax)


def _is_causal_bias(mask) -> bool:
    """Whether ``mask`` is torch's ``CausalBias``. Its module is not imported here: it imports dynamo, most of a
    second of ``import vitmad`` (flex_call says more); none can exist unless the model's code imported it."""
    bias_module = sys.modules.get("torch.nn.attention.bias")
    return bias_module is not None and isinstance(mask, bias_module.CausalBias)


def _is_call_of(value, softmax: bool) -> bool:
    value = getattr(value, "func", value)  # functools.partial(F.scaled_dot_product_attention, ...)
    return value is _SDPA or value is F.scaled_dot_product_attention or is_flex_attention(value) or (
        softmax and (isinstance(value, nn.Softmax) or any(value is known for known in _SOFTMAX_VALUES)))


def _methods(cls: type, name: str) -> list:
    """The functions named ``name`` on ``cls`` and its bases (``super().forward()`` runs a base's)."""
    found = []
    for base in cls.__mro__:
        value = base.__dict__.get(name)
        found.append(value.__func__ if isinstance(value, (staticmethod, classmethod)) else value)
    return found


def _reaches(cls: type, function, depth: int, softmax: bool, instance: nn.Module | None = None) -> bool:
    """Whether ``function`` (a user's module's forward) calls the fused attention (``softmax``: or a softmax)
    under another name: a global bound to it (``sdpa = F.scaled_dot_product_attention``,
    ``from torch.nn.functional import softmax as sm``), an attribute of the module ``instance`` bound to it
    (``self.attend = F.scaled_dot_product_attention``), or through a helper function of the user's or a method of
    ``cls`` or its bases, followed ``depth`` calls deep."""
    function = inspect.unwrap(function) if callable(function) else None
    code = getattr(function, "__code__", None)
    namespace = getattr(function, "__globals__", None)
    if code is None or not isinstance(namespace, dict):
        return False
    globals_, attributes = _names_read(code)
    names = _FUSED_NAMES + (_SOFTMAX_NAMES if softmax else ())
    if any(name in globals_ or name in attributes for name in names):
        return True  # F.scaled_dot_product_attention(...), x.softmax(-1), spelled in the source
    helpers = []
    for name in globals_:
        value = namespace.get(name)
        if _is_call_of(value, softmax):
            return True
        helpers.append(value)
    if any(_is_call_of(value, softmax) for value in function.__defaults__ or ()):  # def f(x, attend=F.sdpa)
        return True
    # An instance's attributes, its submodules among them (nn.Module keeps those apart from its __dict__).
    own = {} if instance is None else {**instance._modules, **vars(instance)}
    for name in attributes:
        bound = [own.get(name), *_methods(cls, name)]  # an instance's or a class's attribute, a method
        if any(_is_call_of(value, softmax) for value in bound):
            return True
        helpers += bound
    return bool(depth) and any(
        inspect.isfunction(helper) and not helper.__module__.startswith("torch")
        and _reaches(cls, helper, depth - 1, softmax) for helper in helpers)


# What random token selection reads: random numbers, and an order drawn from them (MAE's random_masking:
# argsort(rand(...)), then a gather of the kept patches).
_RANDOM_DRAWS = frozenset({"rand", "rand_like", "randn", "randn_like", "uniform_", "normal_"})
_ORDERINGS = frozenset({"argsort", "sort", "topk"})


def random_ordering(cls: type) -> str | None:
    """The qualified name (``Class.method``) of the first function among ``cls.forward`` and the methods of ``cls``
    and the user's helper functions it calls (three calls deep) that draws random numbers and orders by them, as
    MAE's ``random_masking`` shuffles the patches and keeps a subset; None where none does. Submodules' forwards are not
    followed (a timm PatchDropout's is its own module's, known by its class)."""
    seen: set = set()

    def visit(function, depth: int) -> str | None:
        function = inspect.unwrap(function) if callable(function) else None
        code = getattr(function, "__code__", None)
        if code is None or code in seen:
            return None
        seen.add(code)
        globals_, attributes = _names_read(code)
        names = globals_ | attributes
        if names & _RANDOM_DRAWS and names & _ORDERINGS and _orders_by_random(function):
            return function.__qualname__.rpartition("<locals>.")[2]  # (a class defined in a function: its name)
        if not depth:
            return None
        namespace = getattr(function, "__globals__", {})
        helpers = [*(namespace.get(name) for name in globals_),
                   *(method for name in attributes for method in _methods(cls, name))]
        for helper in helpers:
            if inspect.isfunction(helper) and not helper.__module__.startswith("torch"):
                found = visit(helper, depth - 1)
                if found is not None:
                    return found
        return None

    return visit(getattr(cls, "forward", None), 3)


def _called_name(node: ast.AST) -> str | None:
    """The name a call calls (``torch.rand(...)``, ``rand(...)``, ``x.argsort(...)``: the last part), or None."""
    if isinstance(node, ast.Call):
        return node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
    return None


def _training_test(test: ast.AST) -> bool | None:
    """True for ``if self.training``, False for ``if not self.training``, None for another test."""
    negated = isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not)
    inner = test.operand if negated else test
    if isinstance(inner, ast.Attribute) and inner.attr == "training":
        return not negated
    return None


def _eval_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node of ``tree`` outside the branches that run in training mode only (``if self.training:``'s body,
    ``if not self.training:``'s else): mixup's batch permutation, random erasing and the like, not run in eval."""
    kept, stack = [], [tree]
    while stack:
        node = stack.pop()
        kept.append(node)
        training = _training_test(node.test) if isinstance(node, ast.If) else None
        if training is not None:
            stack.append(node.test)
            stack.extend(node.orelse if training else node.body)
            continue
        stack.extend(ast.iter_child_nodes(node))
    return kept


def _orders_by_random(function) -> bool:
    """Whether ``function``'s source, outside its training-only branches, orders by random numbers, as MAE's
    masking does: an ``argsort`` / ``sort`` / ``topk`` of a random draw itself or of a name assigned one
    (``noise = torch.rand(...)``, then ``torch.argsort(noise)``; ``torch.empty(...).uniform_()``). Random numbers
    used otherwise (noise added to the input, a random crop offset) and a sort of other values are not: a value
    computed from a draw is no draw (QA 338: logits of a noisy input, sorted, were taken for a shuffle). A
    permutation drawn at once (``randperm``, ``multinomial``) is not read: MoCo's batch shuffle and a random caption
    are more common than a token shuffle so drawn (QA 340)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    except (OSError, TypeError, SyntaxError):
        return False
    nodes = _eval_nodes(tree)
    calls = [node for node in nodes if isinstance(node, ast.Call)]

    def draw(node: ast.AST) -> bool:
        # A draw, or a draw moved or cast (torch.rand(...).to(device)), or a name assigned one.
        while isinstance(node, ast.Call):
            if _called_name(node) in _RANDOM_DRAWS:
                return True
            if not isinstance(node.func, ast.Attribute):
                return False
            node = node.func.value
        return isinstance(node, ast.Name) and node.id in drawn

    drawn: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Assign) and draw(node.value):
            drawn.update(target.id for target in node.targets if isinstance(target, ast.Name))
        elif isinstance(node, ast.AnnAssign) and node.value is not None and draw(node.value) \
                and isinstance(node.target, ast.Name):
            drawn.add(node.target.id)
    return any(_called_name(call) in _ORDERINGS and (
        any(draw(argument) for argument in call.args[:1])
        or (isinstance(call.func, ast.Attribute) and draw(call.func.value))) for call in calls)


_MATRIX_PRODUCTS = frozenset({"matmul", "mm", "bmm", "baddbmm", "einsum"})


def _multiplies_with_operator(code) -> bool:
    """Whether a code object (or one nested in it: a comprehension, a lambda) uses ``@`` or ``@=``."""
    return any(op.opname in ("BINARY_MATRIX_MULTIPLY", "INPLACE_MATRIX_MULTIPLY")
               or (op.opname == "BINARY_OP" and op.argrepr in ("@", "@=")) for op in dis.get_instructions(code)) \
        or any(_multiplies_with_operator(const) for const in code.co_consts if inspect.iscode(const))


def _closed_over(function) -> list:
    """The values a function's closure holds (a decorator's wrapper closes over the function it wraps)."""
    values = []
    for cell in getattr(function, "__closure__", None) or ():
        try:
            values.append(cell.cell_contents)
        except ValueError:  # an empty cell
            pass
    return values


def multiplies_matrices(module: nn.Module) -> bool:
    """Whether a module's forward multiplies matrices (``@``, ``matmul``, ``mm``, ``bmm``, ``einsum``), itself or in
    a method of its class or a function of the user's it calls (as :func:`_reaches` follows them, and a
    decorator's closure), two calls deep: attention's scores do, a head's softmax of a projection does not."""
    cls = type(module)

    def multiplies(function, depth: int) -> bool:
        code = getattr(inspect.unwrap(function) if callable(function) else None, "__code__", None)
        if code is None:
            return False
        globals_, attributes = _names_read(code)
        if _MATRIX_PRODUCTS & (globals_ | attributes) or _multiplies_with_operator(code):
            return True
        namespace = getattr(function, "__globals__", {})
        helpers = [*(namespace.get(name) for name in globals_),
                   *(method for name in attributes for method in _methods(cls, name)), *_closed_over(function)]
        return depth > 0 and any(
            inspect.isfunction(helper) and not helper.__module__.startswith("torch") and helper is not function
            and multiplies(helper, depth - 1) for helper in helpers)

    return multiplies(getattr(cls, "forward", None), 2)


def _reaches_fused_attention(module: nn.Module) -> bool:
    """Whether a user's module (not a library's: theirs are known without it) calls the fused attention through an
    alias, a helper function or a method, three calls deep: such a block was left out of the default layers
    silently, its neighbours recorded, so ``rec.mad[1]`` was another block's (QA 257). Whether it is a layer is
    :func:`source_attention_modules`' choice (not where it holds attention below it)."""
    return not is_known_library(type(module)) and reaches_fused_attention(module)


def reaches_fused_attention(module: nn.Module) -> bool:
    """Whether a module's forward calls ``F.scaled_dot_product_attention`` or ``flex_attention`` (itself, or a
    helper three calls deep), a library's module too."""
    cls = type(module)
    return _reaches(cls, getattr(cls, "forward", None), 3, softmax=False, instance=module)


def names_softmax(module: nn.Module) -> bool:
    """Whether a module's forward names a softmax or the fused attention (itself, or a helper three calls deep)."""
    return _reaches(type(module), getattr(type(module), "forward", None), 3, softmax=True, instance=module)


def may_compute_attention(module: nn.Module) -> bool:
    """Whether a module a wildcard in ``layers=`` matched, which vitmad did not find, may compute attention: a
    user's module always (its attention may be computed any way, which its forward shows when it runs); a module of
    a library vitmad reads only where its forward names a softmax, ``scaled_dot_product_attention`` or
    ``flex_attention`` (itself, or a helper three calls deep); torch's own modules where they hold such a module or
    a softmax (a container, a checkpoint wrapper), or are ``nn.MultiheadAttention``; never a linear layer, a norm, a
    dropout, nor a softmax alone (its holder is the layer). RT-DETR's ``model.28.decoder.*`` took 90 norms,
    dropouts, projections and MLPs for layers, and the recording refused only when read (QA 258)."""
    cls = type(module)
    if cls.__module__.startswith("torch."):
        return isinstance(module, nn.MultiheadAttention) or any(
            isinstance(child, nn.Softmax) or may_compute_attention(child) for child in module.children())
    if not is_known_library(cls):
        return True
    return names_softmax(module)


def _names_flex_attention(cls: type) -> bool:
    """Whether ``cls.forward`` reads a global of its module bound to torch's ``flex_attention`` under another name
    (``from torch.nn.attention.flex_attention import flex_attention as fa``). A helper function that calls it is not
    looked into: such a module is recorded where ``layers=`` names it."""
    forward = inspect.unwrap(getattr(cls, "forward", None) or (lambda: None))
    code, namespace = getattr(forward, "__code__", None), getattr(forward, "__globals__", None)
    return code is not None and isinstance(namespace, dict) and any(
        is_flex_attention(namespace.get(name)) for name in code.co_names)


def _computes_attention(cls: type) -> bool:
    """Whether ``cls.forward`` calls the fused attention itself, or is an attention class computing a softmax."""
    if _calls_fused_attention(cls):
        return True
    source = forward_source(cls)
    return _named_as_attention(cls) and "softmax(" in source


def _named_as_attention(cls: type) -> bool:
    """Whether the class's name says attention (``Attention``, ``Attn``, ``CrossAttn`` ...)."""
    return bool(re.search(r"Att(entio)?n", cls.__name__))


def calls_functional_multihead(cls: type) -> bool:
    """Whether ``cls.forward`` calls ``F.multi_head_attention_forward`` itself (CLIP's attention pool): such a
    module's calls of the function are its own attention, not those of a module it holds."""
    return "multi_head_attention_forward(" in forward_source(cls)


def attends_itself(module: nn.Module) -> bool:
    """Whether ``module``'s own forward may attend: it names a softmax or the fused attention (itself, or a helper
    three calls deep) and holds query or key projections of its own. A softmax without them (a router over experts,
    a gate over branches, a pooling weight) is no attention of the module's (QA 418)."""
    return names_softmax(module) and _holds_query_key_projection(module)


def named_with_projections(module: nn.Module) -> bool:
    """Whether ``module`` is a user's class named as attention holding query or key projections (an attention that
    normalises its logits by hand, ``exp(l - max) / sum``, names no softmax, yet is one, QA 426)."""
    cls = type(module)
    return is_users_class(cls) and _named_as_attention(cls) and _holds_query_key_projection(module)


def _holds_query_key_projection(module: nn.Module) -> bool:
    """Whether ``module`` holds a query or key projection of its own, by name (``_QUERY_KEY_NAMES``)."""
    return any(isinstance(getattr(module, p, None), nn.Module) for p in _QUERY_KEY_NAMES)


def _attends_through_its_softmax_module(module: nn.Module) -> bool:
    """Whether ``module`` is a user's class named as attention whose forward calls an ``nn.Softmax`` it holds
    (``self.attend = nn.Softmax(dim=-1)``: lucidrains' vit-pytorch ``Attention`` pasted into a user's code, which
    was refused as no attention vitmad knows: its source names no ``softmax(`` call, QA 412). The library's own
    classes are found by their family."""
    cls = type(module)
    return (not is_known_library(cls) and _named_as_attention(cls)
            and any(isinstance(child, nn.Softmax) for child in module.children()) and names_softmax(module))


# Names of query / key projections: a softmax-computing "attention" class without one is a CNN's attention over
# channels or branches (SKNet's SelectiveKernelAttn, ResNeSt's SplitAttn), not attention between tokens.
_QUERY_KEY_NAMES = ("q", "k", "qk", "qkv", "kv", "query", "key", "to_q", "to_qkv", "wq", "q_proj", "qkv_proj",
                    "in_proj")


def source_attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules of any design whose own forward computes attention: it calls
    ``F.scaled_dot_product_attention`` or ``flex_attention``, or the class is named as attention, has a query or key
    projection and computes a softmax (blocks that attend without an attention submodule, attention modules outside
    timm's and transformers' conventions)."""
    found, reached = {}, {}
    for name, module in named_module_list(model):
        cls = type(module)
        if cls.__module__.split(".")[0] == "torch":
            continue
        if (_computes_attention(cls) or _attends_through_its_softmax_module(module)) and (
                _calls_fused_attention(cls) or any(
                    isinstance(getattr(module, p, None), nn.Module) for p in _QUERY_KEY_NAMES)):
            found[name] = module
        elif _reaches_fused_attention(module):
            reached[name] = module
    # A module reaching the fused attention through its helpers that holds attention below it (a model whose pool
    # method attends, an encoder of blocks) is no one layer: taken for one, it swallowed its blocks, or was
    # recorded beside them (QA 262, 265).
    for name, module in reached.items():
        inside = [other for other in (*found, *reached) if other != name and (not name or other.startswith(name + "."))]
        if not inside and not any(isinstance(inner, nn.MultiheadAttention) or hasattr(inner, "fused_attn")
                                  for inner in module.modules() if inner is not module):
            found[name] = module
    return found


def _sdpa_arguments(args: tuple, kwargs: dict) -> tuple:
    """(query, key, attn_mask, is_causal, scale, enable_gqa) of a ``scaled_dot_product_attention`` call."""
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    bound = dict(zip(names, args)) | kwargs
    return (bound["query"], bound["key"], bound.get("attn_mask"), bound.get("is_causal", False),
            bound.get("scale"), bound.get("enable_gqa", False))


def _softmax_dim(args: tuple, kwargs: dict) -> int | None:
    dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
    return None if dim is None else int(dim)


def _storage(tensor: torch.Tensor) -> int:
    """The address of ``tensor``'s storage, which its views share."""
    try:
        return tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # a tensor without a storage (a subclass, a functional tensor)
        return -1 - id(tensor)


_MHA_FUNCTION = inspect.unwrap(F.multi_head_attention_forward).__code__


def _run_by_another_module(module: nn.Module) -> bool:
    """Whether the ``F.multi_head_attention_forward`` call being handled was made by a method of a module other than
    ``module``: the ``nn.MultiheadAttention`` layer a block holds beside attending itself (its own softmax, then the
    layer over the result, or cross-attention to text), or a module it holds that calls the function with weights of
    its own. Read as the block's, that attention replaced the block's own without a word, or the block was refused
    (QA 406, QA 411); it is that module's, recorded as a layer of its own or not at all. A call from ``module``'s own
    methods (a subclass of the layer reaching its forward through ``super()``) or from a plain function is
    ``module``'s. (Called from the mode's handler: the function's frame is a few frames up.)"""
    frame = sys._getframe(1)
    for _ in range(12):
        if frame is None:
            return False
        if frame.f_code is _MHA_FUNCTION:
            caller = frame.f_back
            owner = None if caller is None else caller.f_locals.get("self")
            return isinstance(owner, nn.Module) and owner is not module
        frame = frame.f_back
    return False


class _CaptureAttention(TorchFunctionMode):
    def __init__(self, layer: str, module: nn.Module, on_qk: AttentionCallback, on_probs: ProbabilitiesCallback | None,
                 view: ProbabilitiesView | None = None):
        super().__init__()
        self.layer, self.module, self.on_qk, self.on_probs, self.view = layer, module, on_qk, on_probs, view
        # Whose F.multi_head_attention_forward calls are this module's own attention: a subclass of
        # nn.MultiheadAttention with a forward of its own, or a module whose forward calls the function itself (CLIP's
        # attention pool). In any other module such a call is a held module's (a layer beside the block's own
        # softmax, reached through helpers, a checkpoint or that module's own capture), which was read as the
        # block's attention without a word (QA 415).
        self.reads_functional = isinstance(module, nn.MultiheadAttention) or calls_functional_multihead(type(module))
        self.active = True  # False once the recording has ended
        self.call: ModuleCall | None = None  # the module's forward this mode was entered for
        self.unread_flex = False  # a flex_attention call vitmad could not read ran in the current forward
        # A softmax over another dim, or a logsumexp / log_softmax, of rank 3 or more ran in the current forward
        # (ModuleAttentionHooks.normalised_unread).
        self.unread_softmax = False
        self.exps: list[torch.Tensor] = []  # the current forward's latest exps of rank 3 or more (_KEPT)
        self.reciprocals: list[torch.Tensor] = []  # and reciprocals of a normaliser
        # The current forward's nn.Linear calls: the storage of each output -> (its input, the output), both held
        # until the forward ends, so that no address is freed and reused by another tensor meanwhile (a LoRA sum
        # at a freed lora_B output's address was taken for a projection of lora_A's, QA 335) (_other_keys).
        self.projected: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _in_forward(self) -> bool:
        """Whether the module's forward that entered this mode is still running. One that a KeyboardInterrupt
        ended leaves the mode on its thread's stack until the module's next forward: the calls it sees meanwhile
        (a user's softmax after catching the interrupt, another recorded module's attention) are not its module's.
        Checked only at the calls it would record, since it walks the stack."""
        return self.call is None or module_call_live(self.call, self.module)

    def _other_keys(self, query: torch.Tensor, key: torch.Tensor) -> bool:
        """Whether this forward projected ``query`` and ``key`` (views of nn.Linear outputs, as split heads are)
        from different inputs: cross-attention to another sequence (text tokens, a second view) that happens to
        be as long as the image's, which was recorded as MAD silently (QA 333). Keys projected apart from the same
        tokens (q(x), k(x)), or from equal ones, are self-attention; keys changed after their projection (a norm,
        rotary embeddings) cannot be traced and are taken as they are."""
        source, key_source = self._projected_from(query), self._projected_from(key)
        if source is None or key_source is None or source is key_source:
            return False
        return source.shape != key_source.shape or not torch.equal(source, key_source)

    def _projected_from(self, tensor: torch.Tensor) -> torch.Tensor | None:
        """The input of the nn.Linear call of this forward whose output ``tensor`` is a view of, or None."""
        entry = self.projected.get(_storage(tensor))
        return None if entry is None else entry[0]

    def _see_by_hand(self, func, args, result) -> None:
        """Follow a softmax by hand: an exp divided by its normaliser (``unread_softmax``)."""
        if not isinstance(result, torch.Tensor) or not args:
            return
        first = args[0]
        second = args[1] if len(args) > 1 else None
        if func in _EXP and result.dim() >= 3:
            self._keep(self.exps, result)
            return
        if func in _RECIPROCALS and isinstance(first, torch.Tensor) and _normaliser_shape(first.shape):
            self._keep(self.reciprocals, result)
            return
        if not self.exps:  # (every torch call of a captured forward comes here: most before any exp)
            return
        exp = next((t for t in (first, second) if isinstance(t, torch.Tensor) and any(t is e for e in self.exps)),
                   None)
        if exp is None:
            return
        other = second if exp is first else first
        normaliser = isinstance(other, torch.Tensor) and _normalises(exp.shape, other.shape)
        if func in _DIVISIONS and exp is first and normaliser:
            self.unread_softmax = True
        elif func in _MULTIPLICATIONS and normaliser and any(other is r for r in self.reciprocals):
            self.unread_softmax = True
        elif func in _KEEPING and result.shape == exp.shape:
            self._keep(self.exps, result)

    @staticmethod
    def _keep(kept: list, tensor: torch.Tensor) -> None:
        kept.append(tensor)
        del kept[:-_KEPT]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.active:
            return func(*args, **kwargs)
        if func is _FLEX_HOP:
            self.unread_flex = True
        if func is F.linear:  # (not _in_forward: a stack walk per projection; the record is reset per forward)
            result = func(*args, **kwargs)
            if isinstance(result, torch.Tensor) and args and isinstance(args[0], torch.Tensor):
                self.projected[_storage(result)] = (args[0], result)
            return result
        if func is _SDPA and self._in_forward():
            query, key, mask, is_causal, scale, enable_gqa = _sdpa_arguments(args, kwargs)
            if is_causal or _is_causal_bias(mask):  # torch's causal masks, whose storage is no bias (QA 300)
                raise ValueError(
                    f"vitmad.record: {self.layer} ({type(self.module).__name__}) runs causal attention; MAD is "
                    f"defined for a vision transformer's bidirectional attention{CAUSAL_ADVICE}"
                )
            # The call itself first: arguments it cannot take fail with torch's error, not with vitmad's refusal.
            result = func(*args, **kwargs)
            other_keys = self._other_keys(query, key)
            if enable_gqa and key.shape[-3] != query.shape[-3]:
                key = key.repeat_interleave(query.shape[-3] // key.shape[-3], dim=-3)
            self.on_qk(self.layer, query, key, scale, mask, other_keys=other_keys)
            if (mask is not None and query.shape[-2] == key.shape[-2]
                    and not first_query_looks_ahead(kept_keys(mask[..., :1, :]))):  # SDPA refused masks below 2-D
                # A causal mask given as a mask (QA 299: attn_mask=tril(ones) was recorded), refused as flex's is;
                # after the call is placed, so that a family's own refusal of its layout is said first. Read whole
                # only where its first query keeps no later key: a padding mask is read one row.
                kept = kept_keys(mask).expand(*mask.shape[:-2], query.shape[-2], key.shape[-2])
                # [B, H, Nq, Nk] as SDPA broadcasts it: a 3-D mask's first dim is the heads' (QA 300).
                kept = kept.reshape(-1, *kept.shape[-3:]) if kept.dim() > 4 else kept[(None,) * (4 - kept.dim())]
                refuse_causal(f"{self.layer} ({type(self.module).__name__})", kept,
                               "its scaled_dot_product_attention mask")
            return result
        if func is F.multi_head_attention_forward and self.reads_functional and self._in_forward() \
                and not _run_by_another_module(self.module):
            # nn.MultiheadAttention's one fused function, whose SDPA call within it this mode does not see: a
            # subclass's forward of its own calling the layer's, or a block calling the function with its own
            # weights (CLIP's attention pool), is read from the function's arguments, as the layer's hooks read its
            # own (mha_capture). It ran without computing attention, said the recording (QA 398). The call of a
            # MultiheadAttention layer a block holds is that layer's, not the block's (_run_by_another_module).
            from .mha_capture import functional_mha_query_key  # (mha_capture imports this module)

            result = func(*args, **kwargs)
            q, k, scale, mask, other_keys, padded = functional_mha_query_key(
                f"{self.layer} ({type(self.module).__name__})", args, kwargs)
            self.on_qk(self.layer, q, k, scale, mask, other_keys=other_keys, padded=padded)
            return result
        if func is flex_attention and self._in_forward():
            result = func(*args, **kwargs)
            query, key, scale, mask = flex_logits(f"{self.layer} ({type(self.module).__name__})", args, kwargs)
            with without_autocast(query.device):
                self.on_qk(self.layer, query, key, scale, mask)
            return result
        result = func(*args, **kwargs)
        if self.on_probs is None:  # the module's attention is read elsewhere (probabilities_from)
            return result
        if func in _NORMALISING and args and isinstance(args[0], torch.Tensor) and args[0].dim() >= 3:
            self.unread_softmax = True
        self._see_by_hand(func, args, result)
        if func in _SOFTMAX_FUNCTIONS and isinstance(result, torch.Tensor) and result.dim() >= 3:
            dim = _softmax_dim(args, kwargs)
            if dim is None:
                return result
            if self.view is not None:
                probabilities = self.view(result, dim)
            else:
                probabilities = result if dim % result.dim() == result.dim() - 1 else None
            if probabilities is not None and self._in_forward():
                self.on_probs(self.layer, probabilities.detach())
            elif probabilities is None:
                self.unread_softmax = True
        return result


class ModuleAttentionHooks:
    """Captures the attention of each given module, fused or explicit, while installed.

    Args:
        modules: the attention modules to record, by qualified name.
        on_qk: called with ``(name, q, k, scale, mask)`` for every ``F.scaled_dot_product_attention`` and
            ``flex_attention`` call, an SDPA call's with ``other_keys=`` too (its q and k projected in this forward
            from different inputs: :meth:`_CaptureAttention._other_keys`).
        on_probs: called with ``(name, probabilities)`` for every softmax over the last dimension.
        done: called with ``(name, module, completed)`` when a recorded module's forward has ended.
        probabilities_from: by module name, a submodule whose input is the attention the module applies, for
            designs that build it from several softmax calls (ConViT's GPSA mixes two); their softmax calls are
            then not reported.
        probabilities_views: by module name, the view of its softmax calls that is its attention ``[..., Nq, Nk]``,
            for modules whose softmax runs over another dim than the last.
        unread_flex: ``(name, module) -> message`` of the error refusing a module whose forward ran a
            ``flex_attention`` call vitmad could not read (a family may know better why: diffusers' attention
            backends); by default :func:`.flex_call.unread_flex_refusal`.
    """

    def __init__(self, modules: dict[str, nn.Module], on_qk: AttentionCallback, on_probs: ProbabilitiesCallback,
                 done: DoneCallback, probabilities_from: dict[str, nn.Module] | None = None,
                 probabilities_views: dict[str, ProbabilitiesView] | None = None,
                 unread_flex: Callable[[str, nn.Module], str] | None = None):
        self.modules = modules
        self.unread_flex = unread_flex or unread_flex_refusal
        self.on_qk = on_qk
        self.on_probs = on_probs
        self.done = done
        self.probabilities_from = probabilities_from or {}
        self.probabilities_views = probabilities_views or {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self.trailing: list[torch.utils.hooks.RemovableHandle] = []  # hooks the recording keeps after the user's
        self._modes: list[_CaptureAttention] = []
        # By module name: whether its last forward normalised logits in a form not read as its attention (a
        # softmax over another dim than the last, a logsumexp or log_softmax), told before ``done``.
        self.normalised_unread: dict[str, bool] = {}
        self._flex = False  # FlexAttentionStandIn entered
        # Per thread, as torch's mode stacks are: the modes active now, in the order they were entered (a backward
        # recomputing a checkpointed layer in one thread must not leave the mode another thread's forward holds).
        self._local = threading.local()

    @property
    def _entered(self) -> list[TorchFunctionMode]:
        entered = getattr(self._local, "entered", None)
        if entered is None:
            entered = self._local.entered = []
        return entered

    def install(self) -> None:
        if self.modules:
            FlexAttentionStandIn.enter()
            self._flex = True
        for name, module in self.modules.items():
            source = self.probabilities_from.get(name)
            mode = _CaptureAttention(name, module, self.on_qk, self.on_probs if source is None else None,
                                     self.probabilities_views.get(name))
            self._modes.append(mode)
            if source is not None:
                self._handles.append(source.register_forward_pre_hook(
                    lambda _, args, name=name: self.on_probs(name, args[0].detach())))

            def enter(module, args, name=name, mode=mode) -> None:
                if mode in self._entered:
                    # The last forward never ended: torch runs always_call hooks on an Exception, not on a
                    # KeyboardInterrupt. Its mode is left and its calls dropped before this forward starts.
                    self._leave(mode)
                    self.done(name, module, False)
                mode.call = current_module_call()
                mode.unread_flex = False
                mode.unread_softmax = False
                mode.exps.clear()
                mode.reciprocals.clear()
                mode.projected.clear()
                mode.__enter__()
                self._entered.append(mode)

            def leave(module, args, output, name=name, mode=mode) -> None:
                self._leave(mode)
                self.normalised_unread[name] = mode.unread_softmax
                if mode.unread_flex and output is not None:
                    self.done(name, module, False)  # what it read of this forward is not all of its attention
                    raise ValueError(self.unread_flex(name, module))
                # A forward that raised reaches this hook with no output: its calls are dropped, not recorded.
                self.done(name, module, output is not None)

            def stop(module, args, output, mode=mode) -> None:
                self._leave(mode)
                mode.projected.clear()  # no tensor of the forward kept past it
                mode.exps.clear()
                mode.reciprocals.clear()

            self._handles.append(module.register_forward_pre_hook(enter))
            # The capture ends with the module's own forward, before the forward hooks that were there first (a
            # user's probe that takes a softmax of the output was read as the attention); `leave` runs after them
            # all, so that done() sees what every hook saw.
            self._handles.append(module.register_forward_hook(stop, prepend=True, always_call=True))
            self._handles.append(module.register_forward_hook(leave, always_call=True))
            self.trailing.append(self._handles[-1])

    def _leave(self, mode: TorchFunctionMode) -> None:
        """Leave ``mode`` and any mode of ours entered after it and still active (interrupted forwards inside it):
        the modes are a stack, so they come off in reverse order."""
        entered = self._entered
        if mode not in entered:
            return
        while entered:
            last = entered.pop()
            last.__exit__(None, None, None)
            if last is mode:
                return

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.trailing.clear()
        # Modes a KeyboardInterrupt left active (see enter): every later call of the thread would go through them.
        entered = self._entered
        while entered:
            entered.pop().__exit__(None, None, None)
        # Those another thread left (stopped by a BaseException it caught) cannot be popped from here: they pass
        # every call through from now on.
        for mode in self._modes:
            mode.active = False
        self._modes.clear()
        if self._flex:
            self._flex = False
            FlexAttentionStandIn.leave()
