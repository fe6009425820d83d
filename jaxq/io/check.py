"""`jaxq check PATH` / `jaxq.check(path)`: validate a Hugging Face checkpoint directory without running it.
`jaxq.load` runs the same checks first and refuses a checkpoint with any problem (CheckpointError).

`check(path)` returns every problem found (an empty list: the checkpoint is good); each Problem names the
file, tensor or config field, says what was expected and what was found, and how to fix it:

1. the directory and config.json; pickle weights (.bin/.pt/.pth/.ckpt/.pkl) anywhere in it are refused
   (unpickling runs code; convert them to safetensors); JSON and tokenizer files are size-bounded;
2. the architecture is supported and config.json gives its sizes;
3. the quantization config names a supported format (jaxq.io.quantized.detect);
4. safetensors headers: bounded JSON, known dtypes, valid shapes, data_offsets inside the file and tiling
   the data section exactly, sizes equal to dtype x shape (checked before any tensor is read);
5. every quantized linear has each tensor its format needs, in the declared dtype and with the shape its
   group/block size implies, and no stray tensor; scales are finite and non-zero (every offending tensor);
6. every exclusion / quantized-layer entry of the config matches a module of the model;
7. FP8 KV scales: for every layer or none (every layer when the config declares an FP8 KV cache);
8. every other tensor is a parameter of the model with its shape, in a float dtype; none is missing.

Only the values of scale-like tensors (scales, g_idx, weight_shape) are read; weights are not.
"""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

from jaxq.io import hf_checkpoint
from jaxq.io.quantized.detect import detect
from jaxq.io.quantized.plan import CheckpointPlan
from jaxq.io.quantized.scheme import FLOAT_DTYPES
from jaxq.io.safetensors_file import SafetensorsFile
from models.hf_interop import ParamsBuilder, expected_shapes
from models.registry import get_model_family

# Tokenizer files are parsed by transformers; bound them before it reads them (a 256k-vocab tokenizer.json
# is about 35 MB).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                    "merges.txt", "tokenizer.model", "generation_config.json")
MAX_TOKENIZER_BYTES = 256 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class Problem:
    """One thing wrong with a checkpoint: `where` (a tensor, file or config field) and what is wrong there."""

    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


class CheckpointError(ValueError):
    """jaxq.load refused a checkpoint; `problems` lists everything `jaxq check` found."""

    def __init__(self, path, problems: list[Problem]):
        self.problems = problems
        listed = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{path} failed {len(problems)} checkpoint check(s):\n{listed}")


@dataclasses.dataclass
class Inspection:
    """What check() found: the problems, and for a quantized checkpoint the plan jaxq.load loads through."""

    problems: list[Problem]
    plan: CheckpointPlan | None = None


def check(path) -> list[Problem]:
    """Every problem of the checkpoint directory at path (see the module docstring); [] when it is good."""
    return inspect_checkpoint(path).problems


def inspect_checkpoint(path) -> Inspection:
    """check(path) plus the quantized checkpoint's plan (None for an unquantized one or when a problem
    prevents making it)."""
    root = Path(path)
    problems: list[Problem] = []
    add = lambda where, message: problems.append(Problem(str(where), message))
    if not root.is_dir():
        add(root, "not a checkpoint directory" + (" (it does not exist)" if not root.exists() else
                                                   "; pass the directory that holds config.json"))
        return Inspection(problems)
    for p in sorted(root.iterdir()):
        if p.suffix in hf_checkpoint.PICKLE_SUFFIXES:
            add(p, "pickle file: jaxq never unpickles (it runs code). Convert the checkpoint to safetensors "
                   "(transformers: from_pretrained(dir).save_pretrained(out_dir)) and remove this file")
        elif p.name in _TOKENIZER_FILES and p.stat().st_size > MAX_TOKENIZER_BYTES:
            add(p, f"{p.stat().st_size} bytes, above the {MAX_TOKENIZER_BYTES}-byte bound for tokenizer files")
    try:
        hf = hf_checkpoint.read_hf_config(root)
        family = get_model_family(hf.get("architectures") or [])
        config = family.config_class.from_hf_config(hf)
        scheme = detect(root, hf)
        paths = hf_checkpoint.safetensors_files(root)
    except (ValueError, FileNotFoundError, TypeError, KeyError) as e:
        add(root, str(e))
        return Inspection(problems)
    files = []
    for path in paths:  # every broken header is reported; tensor checks need them all
        try:
            files.append(SafetensorsFile(path))
        except ValueError as e:
            add(path, str(e).removeprefix(f"{path}: "))
    if len(files) < len(paths):
        return Inspection(problems)
    headers: dict[str, SafetensorsFile] = {}
    for st in files:
        for name in st.keys():
            if name in headers:
                add(name, f"appears in both {headers[name].path} and {st.path}; keep one")
            headers.setdefault(name, st)
    plan = None if scheme is None else CheckpointPlan(scheme, family, config, headers)
    if plan is not None:
        problems += _check_plan(plan, headers, config)
    problems += _check_params(family, config, plan, headers, root)
    return Inspection(problems, plan)


def _check_plan(plan: CheckpointPlan, headers: dict[str, SafetensorsFile], config) -> list[Problem]:
    scheme, problems = plan.scheme, []
    add = lambda where, message: problems.append(Problem(where, message))
    for module, linear in plan.quantized.items():
        if linear.error:
            add(module, linear.error)
            continue
        for role, spec in linear.specs.items():
            name = f"{module}.{role}"
            if name not in headers:
                if spec.required:
                    add(name, f"missing: {scheme.description} stores {module} as {linear.recipe.name}, which needs "
                              f"{role} ({spec.why}, {'/'.join(spec.dtypes)}); restore it from the original export, "
                              "or exclude the module in the quantization config if it is not quantized")
                continue
            st = headers[name]
            if st.dtype_name(name) not in spec.dtypes:
                add(name, f"has dtype {st.dtype_name(name)}, expected {' or '.join(spec.dtypes)} "
                          f"({scheme.description})")
            elif st.shape(name) not in spec.shapes:
                expected = " or ".join(str(list(s)) for s in spec.shapes)
                add(name, f"has shape {list(st.shape(name))}, expected {expected} ({spec.why}; weight [N, K] = "
                          f"{list(linear.shape)}, recipe {linear.recipe.name} group_size {linear.recipe.group_size})")
            elif spec.values is not None and (bad := spec.values(st.read(name))):
                add(name, bad)
    problems += [Problem(name, why) for name, why in _strays(plan, headers).items()]
    modules = _module_names(headers, config)
    for entry in scheme.module_entries():
        if not any(scheme.matches(m, entry) for m in modules):
            add(f"{scheme.entries_field}", f"entry {entry!r} matches no module of the model; fix or remove it")
    problems += _check_kv(plan, headers)
    return problems


def _strays(plan: CheckpointPlan, headers) -> dict[str, str]:
    """{tensor: what is wrong} for tensors of the plan's linears that it does not consume (other than a bias, or
    the weight of a linear left unquantized)."""
    strays, scheme = {}, plan.scheme
    for name in headers:
        module, _, role = name.rpartition(".")
        if plan.module_of(name) is not None or role == "bias":
            continue
        if module in plan.quantized and not plan.quantized[module].error:
            strays[name] = (f"is not part of {scheme.description}'s layout for {module} (expected "
                            f"{sorted(plan.quantized[module].specs)}); remove it or fix the quantization config")
        elif module in plan.unquantized and role != "weight":
            entry = scheme.excluded_by(module)
            why = f"{scheme.entries_field} entry {entry!r}" if entry else "not a quantization target"
            strays[name] = (f"{scheme.description} leaves {module} unquantized ({why}), but the checkpoint has this "
                            "quantization tensor")
    return strays


def _check_kv(plan: CheckpointPlan, headers) -> list[Problem]:
    problems = []
    found = {where: name for name, where in plan.kv.items()}
    wanted = [(i, which) for i in range(plan.num_layers) for which in ("k", "v")]
    missing = [w for w in wanted if w not in found]
    if missing and (plan.scheme.kv_cache or found):
        listed = ", ".join(f"layer {i} {which}_scale" for i, which in missing[:6])
        problems.append(Problem(
            "kv cache", f"{len(missing)} FP8 KV scale(s) missing ({listed}{', ...' if len(missing) > 6 else ''}); "
                        f"{plan.scheme.description} needs self_attn.k_proj.k_scale and v_proj.v_scale for every "
                        "layer"))
    for where, name in found.items():
        st = headers[name]
        if where[0] >= plan.num_layers:
            problems.append(Problem(name, f"layer {where[0]} does not exist (the model has {plan.num_layers})"))
        elif st.dtype_name(name) not in FLOAT_DTYPES or st.shape(name) not in ((), (1,)):
            problems.append(Problem(name, f"is {st.dtype_name(name)}{list(st.shape(name))}, expected one F32 value"))
        elif bad := _scalar_problem(st.read(name)):
            problems.append(Problem(name, bad))
    return problems


def _scalar_problem(x) -> str | None:
    value = float(x.reshape(-1)[0])
    return None if value > 0 and value != float("inf") else f"is {value}; a KV scale must be finite and > 0"


def _module_names(headers, config) -> set[str]:
    """Every module the checkpoint names (all dotted prefixes of its tensors), plus lm_head when the embeddings
    are tied (exporters list it although they drop its duplicate weight)."""
    names = {".".join(parts[:i]) for name in headers for parts in [name.split(".")] for i in range(1, len(parts))}
    if getattr(config, "tie_word_embeddings", False):
        names.add("lm_head")
    return names


def _check_params(family, config, plan: CheckpointPlan | None, headers, root) -> list[Problem]:
    """Everything but the quantized linears' own tensors, as the loader's ParamsBuilder sees it (without
    reading): known names, shapes, float dtypes, nothing missing."""
    problems = []
    weight_map = family.weight_map(config)
    builder = ParamsBuilder(weight_map, expected_shapes(family.module_class(config)), None, lambda *_: None)
    # A quantized linear enters as its finished weight; its own tensors and the strays are _check_plan's.
    skipped = set() if plan is None else {n for n in headers if plan.module_of(n) is not None}
    skipped |= set() if plan is None else set(_strays(plan, headers))
    erroneous = set() if plan is None else {m for m, q in plan.quantized.items() if q.error}
    skipped |= {n for n in headers if n.rpartition(".")[0] in erroneous and not n.endswith(".bias")}
    quantized = [] if plan is None else [(f"{m}.weight", q.shape) for m, q in plan.quantized.items()]
    plain = [(n, headers[n].shape(n)) for n in headers if n not in skipped]
    for name, shape in itertools.chain(plain, quantized):
        try:
            builder.add(name, shape, lambda: None, headers[name].path if name in headers else "<quantized weight>")
        except ValueError as e:
            problems.append(Problem(name, str(e)))
    for name, _ in plain:
        dtype = headers[name].dtype_name(name)
        if dtype not in FLOAT_DTYPES and _is_param(weight_map, name):
            problems.append(Problem(name, f"has dtype {dtype} but loads as a plain parameter, which must be "
                                          f"{'/'.join(FLOAT_DTYPES)}: its scale tensors are missing, or the config "
                                          "excludes its module from quantization"))
    try:
        builder.finish(str(root))
    except ValueError as e:
        problems.append(Problem(str(root), str(e)))
    return problems


def _is_param(weight_map, name: str) -> bool:
    try:
        return weight_map.resolve(name)[1] is not None
    except KeyError:
        return False
