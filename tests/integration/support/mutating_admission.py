"""What the API server does with a MutatingAdmissionPolicy of the examples,
for the tests: match a pod (resource rules, object and namespace selectors
with matchLabels, matchConditions), evaluate the variables and each
ApplyConfiguration mutation with a CEL interpreter (cel-python), and merge
the result into the pod the way server-side apply merges an apply
configuration (lists of containers, volumes, env, mounts and ports by
their key, everything else replaced).

Kubernetes types an apply configuration by its path (`Object.spec{...}`);
here each such literal is a plain map, which is all the merge needs. Only
what the examples use is emulated; anything else is refused.

stdin: {"policy": ..., "binding": ..., "pods": [pod, ...]}, each pod with
"__namespace_labels"; stdout: one mutated pod (or null: not matched) each.
"""
import json, re, sys, copy
import celpy
from celpy import celtypes

# The list fields that server-side apply merges by key (x-kubernetes-list-map-keys).
MERGE_KEYS = {
    "containers": "name", "initContainers": "name", "volumes": "name",
    "env": "name", "volumeMounts": "mountPath", "ports": "containerPort",
}

def plain(v):
    if isinstance(v, dict):
        return {str(k): plain(x) for k, x in v.items()}
    if isinstance(v, list):
        return [plain(x) for x in v]
    if isinstance(v, celtypes.BoolType):
        return bool(v)
    if isinstance(v, (celtypes.IntType, celtypes.UintType)):
        return int(v)
    if isinstance(v, celtypes.DoubleType):
        return float(v)
    if isinstance(v, celtypes.StringType):
        return str(v)
    return v

def merge(live, applied, field=None):
    if isinstance(live, dict) and isinstance(applied, dict):
        out = dict(live)
        for k, v in applied.items():
            out[k] = merge(live.get(k), v, k) if k in live else v
        return out
    if isinstance(live, list) and isinstance(applied, list) and field in MERGE_KEYS:
        key = MERGE_KEYS[field]
        out = [copy.deepcopy(x) for x in live]
        for item in applied:
            at = next((i for i, x in enumerate(out) if x.get(key) == item.get(key)), None)
            if at is None:
                out.append(item)
            else:
                out[at] = merge(out[at], item)
        return out
    return applied

def program(src):
    # Kubernetes types apply configurations by their path (Object.spec...):
    # here each is a plain map, which is what the merge needs.
    src = re.sub(r'\bObject(?:\.\w+)*\s*\{', 'ApplyObject{', src)
    env = celpy.Environment(annotations={"ApplyObject": celtypes.MessageType})
    return env.program(env.compile(src))

def selects(selector, labels):
    if selector is None:
        return True
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions") or []:
        raise SystemExit("matchExpressions are not emulated")
    return True

def admit(policy, binding, pod, ns_labels):
    spec = policy["spec"]
    mc = spec["matchConstraints"]
    labels = pod["metadata"].get("labels") or {}
    if not any("pods" in r.get("resources", []) and ("CREATE" in r.get("operations", []) or "*" in r.get("operations", []))
               for r in mc.get("resourceRules", [])):
        return None
    for sel in (mc.get("objectSelector"), (binding["spec"].get("matchResources") or {}).get("objectSelector")):
        if not selects(sel, labels):
            return None
    for sel in (mc.get("namespaceSelector"), (binding["spec"].get("matchResources") or {}).get("namespaceSelector")):
        if not selects(sel, ns_labels):
            return None
    obj = celpy.json_to_cel(pod)
    for cond in spec.get("matchConditions") or []:
        if not bool(program(cond["expression"]).evaluate({"object": obj})):
            return None
    variables = {}
    for var in spec.get("variables") or []:
        act = {"object": obj, "variables": celtypes.MapType(variables)}
        variables[celtypes.StringType(var["name"])] = program(var["expression"]).evaluate(act)
    out = pod
    for m in spec["mutations"]:
        if m["patchType"] != "ApplyConfiguration":
            raise SystemExit("only ApplyConfiguration is emulated")
        act = {"object": celpy.json_to_cel(out), "variables": celtypes.MapType(variables)}
        out = merge(out, plain(program(m["applyConfiguration"]["expression"]).evaluate(act)))
    return out

req = json.load(sys.stdin)
results = []
for pod in req["pods"]:
    results.append(admit(req["policy"], req["binding"], pod, pod.pop("__namespace_labels", {})))
json.dump(results, sys.stdout)
