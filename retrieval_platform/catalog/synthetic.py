"""The embedded default data: a seeded, realistic synthetic product catalog with graded queries.

What it models, because retrieval training needs it:

- a category tree of product types, each with brands, attributes (colour, size, material, ...)
  and a price range;
- product *families*: one model of one brand sold in several colour/size variants. Variants are
  near-duplicates (the false negatives the stage-1 mask must not push away) and share a
  ``variant_group``; a few products are also relisted under a new id with the same title;
- complementary types (a phone and its case, a drill and its bits);
- queries written the way shoppers type: short, colloquial, with synonyms and misspellings;
- graded judgments by rule (ESCI labels): the right type meeting every constraint of the query is
  Exact, the right type missing a constraint is a Substitute, a complementary type is a
  Complement, anything else is Irrelevant.

Deterministic for a seed; 1K to 1M products (about 15 s per 1M on one core).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from retrieval_platform.catalog.schema import JUDGMENT_SCHEMA, PRODUCT_SCHEMA, QUERY_SCHEMA

COLOURS = ["black", "white", "red", "blue", "navy", "green", "grey", "silver", "pink", "beige",
           "brown", "yellow"]


@dataclass(frozen=True)
class ProductType:
    name: str
    path: tuple[str, ...]  # department > sub-category
    synonyms: tuple[str, ...]
    attrs: dict[str, tuple[str, ...]]  # attribute -> values
    variant_axes: tuple[str, ...]  # attributes that vary inside a family
    price: tuple[float, float]
    complements: tuple[str, ...] = ()
    uses: tuple[str, ...] = ()


def _t(name, path, synonyms, attrs, axes, price, complements=(), uses=()) -> ProductType:
    return ProductType(name, tuple(path.split(" > ")), tuple(synonyms), attrs, tuple(axes),
                       price, tuple(complements), tuple(uses))


_C = {"colour": tuple(COLOURS)}
TYPES: tuple[ProductType, ...] = (
    _t("smartphone", "Electronics > Phones", ["mobile phone", "cell phone", "phone"],
       _C | {"storage": ("64GB", "128GB", "256GB", "512GB")}, ["colour", "storage"], (150, 1200),
       ["phone case", "screen protector", "phone charger"], ["photography", "gaming"]),
    _t("phone case", "Electronics > Phone Accessories", ["phone cover", "protective case"],
       _C | {"material": ("silicone", "leather", "plastic", "rubber")}, ["colour"], (8, 45),
       ["smartphone", "screen protector"], ["drop protection"]),
    _t("screen protector", "Electronics > Phone Accessories", ["screen guard", "tempered glass"],
       {"material": ("tempered glass", "film")}, [], (5, 25), ["smartphone", "phone case"]),
    _t("phone charger", "Electronics > Phone Accessories", ["charging cable", "usb charger",
       "fast charger"], {"wattage": ("20W", "30W", "65W"), "connector": ("USB-C", "Lightning")},
       ["wattage", "connector"], (9, 40), ["smartphone", "laptop"]),
    _t("headphones", "Electronics > Audio", ["over ear headphones", "headset"],
       _C | {"style": ("over-ear", "on-ear")}, ["colour"], (25, 400),
       ["headphone stand", "bluetooth speaker"], ["travel", "gaming", "studio"]),
    _t("headphone stand", "Electronics > Audio", ["headset holder"],
       {"material": ("wood", "aluminium", "plastic")}, [], (12, 50), ["headphones"]),
    _t("wireless earbuds", "Electronics > Audio",
       ["earbuds", "bluetooth earbuds", "in ear headphones"], _C, ["colour"], (20, 300),
       ["phone charger", "smartphone"], ["running", "commute"]),
    _t("bluetooth speaker", "Electronics > Audio", ["portable speaker", "wireless speaker"],
       _C | {"waterproof": ("IPX5", "IPX7")}, ["colour"], (20, 250), ["phone charger"],
       ["outdoor", "shower", "party"]),
    _t("laptop", "Electronics > Computers", ["notebook computer", "notebook"],
       {"colour": ("silver", "grey", "black", "blue"), "screen size": ("13 inch", "14 inch",
        "15.6 inch", "17 inch"), "memory": ("8GB RAM", "16GB RAM", "32GB RAM")},
       ["colour", "memory"], (300, 2500), ["laptop bag", "wireless mouse", "keyboard"],
       ["students", "gaming", "office"]),
    _t("laptop bag", "Electronics > Computer Accessories", ["laptop backpack", "laptop sleeve"],
       _C | {"screen size": ("13 inch", "14 inch", "15.6 inch", "17 inch")},
       ["colour", "screen size"], (20, 120), ["laptop"], ["travel", "commute"]),
    _t("wireless mouse", "Electronics > Computer Accessories", ["computer mouse", "mouse"],
       _C, ["colour"], (10, 90), ["laptop", "keyboard", "mouse pad"], ["gaming", "office"]),
    _t("mouse pad", "Electronics > Computer Accessories", ["mouse mat"],
       _C, ["colour"], (5, 30), ["wireless mouse"]),
    _t("keyboard", "Electronics > Computer Accessories", ["computer keyboard",
       "mechanical keyboard"], _C | {"layout": ("US", "UK")}, ["colour", "layout"], (20, 200),
       ["wireless mouse", "laptop"], ["gaming", "typing"]),
    _t("electric kettle", "Home > Kitchen", ["water kettle", "tea kettle", "kettle"],
       _C | {"capacity": ("1.0 L", "1.5 L", "1.7 L"), "material": ("stainless steel", "glass",
        "plastic")}, ["colour", "capacity"], (20, 150), ["coffee mug", "tea infuser"], ["tea"]),
    _t("tea infuser", "Home > Kitchen", ["tea strainer"], {"material": ("stainless steel",
       "silicone")}, [], (4, 20), ["electric kettle", "coffee mug"]),
    _t("coffee maker", "Home > Kitchen", ["coffee machine", "drip coffee maker"],
       _C | {"capacity": ("4 cup", "8 cup", "12 cup")}, ["colour", "capacity"], (25, 400),
       ["coffee filters", "coffee mug"], ["office", "home"]),
    _t("coffee filters", "Home > Kitchen", ["paper filters"], {"pack": ("100 pack", "200 pack")},
       ["pack"], (3, 15), ["coffee maker"]),
    _t("coffee mug", "Home > Kitchen", ["mug", "coffee cup"], _C | {"capacity": ("12 oz",
       "16 oz")}, ["colour", "capacity"], (6, 30), ["coffee maker", "electric kettle"]),
    _t("frying pan", "Home > Kitchen", ["skillet", "fry pan"], {"material": ("cast iron",
       "nonstick", "stainless steel"), "size": ("8 inch", "10 inch", "12 inch")}, ["size"],
       (15, 180), ["spatula", "pan lid"], ["eggs", "induction"]),
    _t("spatula", "Home > Kitchen", ["turner", "cooking spatula"], {"material": ("silicone",
       "wood", "stainless steel")}, [], (4, 25), ["frying pan"]),
    _t("pan lid", "Home > Kitchen", ["glass lid", "skillet lid"], {"size": ("8 inch", "10 inch",
       "12 inch")}, ["size"], (8, 35), ["frying pan"]),
    _t("bed sheets", "Home > Bedding", ["sheet set", "bedsheets"], _C | {"size": ("twin",
       "full", "queen", "king"), "material": ("cotton", "linen", "microfiber")}, ["colour", "size"],
       (20, 200), ["pillowcase", "duvet cover", "pillow"]),
    _t("pillow", "Home > Bedding", ["bed pillow"], {"size": ("standard", "queen", "king"),
       "fill": ("memory foam", "down", "polyester")}, ["size"], (15, 120), ["pillowcase",
       "bed sheets"], ["side sleepers", "neck pain"]),
    _t("pillowcase", "Home > Bedding", ["pillow cover"], _C | {"material": ("cotton", "silk",
       "linen")}, ["colour"], (8, 60), ["pillow", "bed sheets"]),
    _t("duvet cover", "Home > Bedding", ["comforter cover", "quilt cover"], _C | {"size": (
       "twin", "queen", "king")}, ["colour", "size"], (30, 180), ["bed sheets", "pillowcase"]),
    _t("office chair", "Home > Furniture", ["desk chair", "computer chair"], _C | {"material": (
       "mesh", "leather", "fabric")}, ["colour"], (60, 600), ["desk", "chair mat"],
       ["back pain", "gaming", "home office"]),
    _t("desk", "Home > Furniture", ["computer desk", "writing desk", "standing desk"],
       {"material": ("oak", "walnut", "metal", "white wood"), "width": ("40 inch", "48 inch",
        "55 inch")}, ["width"], (80, 900), ["office chair", "table lamp", "chair mat"],
       ["home office", "small spaces"]),
    _t("chair mat", "Home > Furniture", ["floor mat for office chair"], {"size": ("36x48 inch",
       "45x53 inch")}, ["size"], (20, 80), ["office chair", "desk"]),
    _t("table lamp", "Home > Lighting", ["desk lamp", "bedside lamp", "reading lamp"],
       _C | {"material": ("ceramic", "metal", "glass")}, ["colour"], (15, 200), ["light bulb",
       "desk"], ["bedroom", "reading"]),
    _t("light bulb", "Home > Lighting", ["led bulb", "bulb"], {"wattage": ("40W", "60W",
       "100W"), "colour temperature": ("warm white", "daylight")}, ["wattage",
       "colour temperature"], (3, 25), ["table lamp"]),
    _t("cordless drill", "Tools > Power Tools", ["power drill", "drill driver", "drill"],
       {"voltage": ("12V", "18V", "20V"), "colour": ("yellow", "red", "blue", "green")},
       ["voltage"], (40, 350), ["drill bits", "battery pack"], ["woodworking", "diy"]),
    _t("drill bits", "Tools > Accessories", ["drill bit set", "bits"], {"material": ("cobalt",
       "titanium", "carbide"), "pieces": ("15 piece", "29 piece", "100 piece")}, ["pieces"],
       (10, 90), ["cordless drill"], ["metal", "wood"]),
    _t("battery pack", "Tools > Accessories", ["tool battery", "replacement battery"],
       {"voltage": ("12V", "18V", "20V"), "capacity": ("2.0Ah", "4.0Ah", "5.0Ah")},
       ["voltage", "capacity"], (30, 160), ["cordless drill"]),
    _t("hammer", "Tools > Hand Tools", ["claw hammer", "framing hammer"], {"weight": ("16 oz",
       "20 oz", "22 oz"), "material": ("steel", "fiberglass", "wood")}, ["weight"], (10, 60),
       ["nails"]),
    _t("nails", "Tools > Hardware", ["wire nails", "finishing nails"], {"length": ("1 inch",
       "2 inch", "3 inch")}, ["length"], (4, 20), ["hammer"]),
    _t("garden hose", "Garden > Watering", ["water hose", "hose"], {"length": ("25 ft", "50 ft",
       "100 ft"), "colour": ("green", "black", "blue")}, ["length", "colour"], (15, 120),
       ["hose nozzle", "hose reel"], ["garden", "car washing"]),
    _t("hose nozzle", "Garden > Watering", ["spray nozzle", "hose sprayer"], {"material": (
       "metal", "plastic")}, [], (6, 35), ["garden hose"]),
    _t("hose reel", "Garden > Watering", ["hose holder"], {"mount": ("wall mount", "cart")},
       ["mount"], (25, 150), ["garden hose"]),
    _t("lawn mower", "Garden > Lawn Care", ["mower", "grass cutter"], {"power": ("electric",
       "gas", "cordless")}, ["power"], (150, 900), ["grass trimmer"], ["small yards", "hills"]),
    _t("grass trimmer", "Garden > Lawn Care", ["string trimmer", "weed eater"], {"power": (
       "electric", "gas", "cordless")}, ["power"], (50, 300), ["lawn mower"]),
    _t("running shoes", "Sports > Footwear", ["sneakers", "trainers", "jogging shoes"],
       _C | {"size": ("US 7", "US 8", "US 9", "US 10", "US 11", "US 12"), "gender": ("men's",
        "women's")}, ["colour", "size"], (40, 220), ["running socks", "shoe laces"],
       ["marathon", "trail running", "flat feet"]),
    _t("running socks", "Sports > Apparel", ["athletic socks", "sport socks"], _C | {"size": (
       "S", "M", "L")}, ["colour", "size"], (8, 30), ["running shoes"]),
    _t("shoe laces", "Sports > Footwear", ["shoelaces", "laces"], _C, ["colour"], (3, 12),
       ["running shoes"]),
    _t("yoga mat", "Sports > Fitness", ["exercise mat", "workout mat"], _C | {"thickness": (
       "4mm", "6mm", "10mm")}, ["colour", "thickness"], (15, 120), ["yoga block", "yoga strap"],
       ["pilates", "hot yoga"]),
    _t("yoga block", "Sports > Fitness", ["foam block"], _C, ["colour"], (8, 30), ["yoga mat",
       "yoga strap"]),
    _t("yoga strap", "Sports > Fitness", ["stretching strap"], _C, ["colour"], (6, 20),
       ["yoga mat", "yoga block"]),
    _t("dumbbells", "Sports > Fitness", ["hand weights", "free weights", "dumbbell set"],
       {"weight": ("5 lb", "10 lb", "20 lb", "50 lb"), "material": ("cast iron", "neoprene",
        "rubber")}, ["weight"], (15, 300), ["weight rack"], ["home gym"]),
    _t("weight rack", "Sports > Fitness", ["dumbbell rack"], {"tiers": ("2 tier", "3 tier")},
       ["tiers"], (40, 250), ["dumbbells"]),
    _t("water bottle", "Sports > Fitness", ["sports bottle", "drink bottle"], _C | {"capacity": (
       "500 ml", "750 ml", "1 L"), "material": ("stainless steel", "plastic", "glass")},
       ["colour", "capacity"], (8, 50), ["gym bag"], ["hiking", "gym"]),
    _t("gym bag", "Sports > Fitness", ["duffel bag", "sports bag"], _C, ["colour"], (20, 120),
       ["water bottle"], ["travel", "gym"]),
    _t("t-shirt", "Clothing > Tops", ["tee", "tshirt", "tee shirt"], _C | {"size": ("S", "M", "L",
       "XL"), "material": ("cotton", "polyester"), "gender": ("men's", "women's")},
       ["colour", "size"], (8, 45), ["jeans"]),
    _t("jeans", "Clothing > Bottoms", ["denim pants", "denim jeans"], {"colour": ("blue", "black",
       "grey"), "fit": ("slim fit", "regular fit", "relaxed fit"), "size": ("30x30", "32x32",
       "34x32", "36x32")}, ["colour", "size"], (25, 150), ["t-shirt", "belt"]),
    _t("belt", "Clothing > Accessories", ["leather belt"], {"colour": ("black", "brown"),
       "size": ("S", "M", "L")}, ["colour", "size"], (12, 80), ["jeans"]),
    _t("dog food", "Pets > Dogs", ["dog kibble", "dry dog food"], {"flavour": ("chicken",
       "beef", "salmon", "lamb"), "bag size": ("5 lb", "15 lb", "30 lb")}, ["flavour",
       "bag size"], (12, 90), ["dog bowl"], ["puppies", "senior dogs"]),
    _t("dog leash", "Pets > Dogs", ["dog lead", "leash"], _C | {"length": ("4 ft", "6 ft")},
       ["colour", "length"], (8, 40), ["dog collar"]),
    _t("dog collar", "Pets > Dogs", ["collar"], _C | {"size": ("S", "M", "L")}, ["colour",
       "size"], (6, 35), ["dog leash"]),
    _t("dog bowl", "Pets > Dogs", ["pet bowl", "food bowl"], {"material": ("stainless steel",
       "ceramic", "plastic")}, [], (5, 30), ["dog food"]),
    _t("stroller", "Baby > Travel", ["pushchair", "pram", "baby stroller"], _C, ["colour"],
       (80, 900), ["car seat"], ["travel", "jogging"]),
    _t("car seat", "Baby > Travel", ["baby car seat", "infant car seat"], _C, ["colour"],
       (60, 450), ["stroller"]),
)
TYPE_INDEX = {t.name: i for i, t in enumerate(TYPES)}

_BRAND_SYLLABLES = ["nor", "vik", "al", "tura", "bri", "sa", "kes", "trel", "oak", "line", "so",
                    "lano", "van", "ta", "ze", "phyr", "lu", "mio", "ve", "ltra", "ax", "on",
                    "pel", "ica", "ro", "vex", "mar", "ino", "dal", "ena"]
_MODEL_WORDS = ["Aero", "Flex", "Nova", "Pro", "Max", "Lite", "Core", "Edge", "Prime", "Zen",
                "Pulse", "Terra", "Orbit", "Vista", "Echo", "Summit", "Drift", "Halo"]
_COLLOQUIAL = ["cheap {}", "best {}", "{} on sale", "good {}", "{} deal", "affordable {}"]


@dataclass
class SyntheticCatalog:
    products: pa.Table
    queries: pa.Table
    judgments: pa.Table
    stats: dict[str, int] = field(default_factory=dict)


def _brands(rng: np.random.Generator, n: int) -> list[str]:
    names: set[str] = set()
    while len(names) < n:
        k = rng.integers(2, 4)
        names.add("".join(rng.choice(_BRAND_SYLLABLES, size=k)).capitalize())
    return sorted(names)


def _misspell(rng: np.random.Generator, word: str) -> str:
    if len(word) < 4:
        return word
    i = int(rng.integers(1, len(word) - 1))
    op = rng.integers(0, 3)
    if op == 0:  # swap two letters
        return word[:i] + word[i + 1] + word[i] + word[i + 2 :]
    if op == 1:  # drop a letter
        return word[:i] + word[i + 1 :]
    return word[:i] + word[i] + word[i:]  # double a letter


@dataclass
class _Families:
    """Products as parallel lists (index = row), and each family's members, type, model and
    brand."""

    pid: list[str] = field(default_factory=list)
    fam_of: list[int] = field(default_factory=list)
    type_of: list[int] = field(default_factory=list)
    attrs_of: list[dict[str, str]] = field(default_factory=list)
    titles: list[str] = field(default_factory=list)
    brand_of: list[str] = field(default_factory=list)
    desc_of: list[str] = field(default_factory=list)
    price_of: list[float] = field(default_factory=list)
    cat_of: list[str] = field(default_factory=list)
    products: list[list[int]] = field(default_factory=list)  # family -> its product rows
    type: list[int] = field(default_factory=list)
    model: list[str] = field(default_factory=list)
    brand: list[str] = field(default_factory=list)

    def members_of_type(self) -> list[list[int]]:
        """type -> its families."""
        out: list[list[int]] = [[] for _ in TYPES]
        for f, t in enumerate(self.type):
            out[t].append(f)
        return out


def generate_catalog(
    num_products: int = 2000,
    *,
    num_queries: int | None = None,
    seed: int = 0,
    relist_fraction: float = 0.01,
    misspell_fraction: float = 0.1,
) -> SyntheticCatalog:
    """Generate products, queries and graded judgments in the canonical schema: families of
    variants, relisted duplicates, then queries each judged over an annotator-like pool."""
    if num_products < len(TYPES):
        raise ValueError(f"num_products must be at least {len(TYPES)}, the number of types")
    rng = np.random.default_rng(seed)
    if num_queries is None:
        num_queries = int(min(50_000, max(50, num_products // 10)))
    brands = _brands(rng, 60)
    type_brands = [list(rng.choice(brands, size=6, replace=False)) for _ in TYPES]
    fams = _make_families(rng, num_products, type_brands)
    _relist(rng, fams, relist_fraction, num_products)
    products = pa.table(
        {
            "product_id": fams.pid,
            "title": fams.titles,
            "description": fams.desc_of,
            "brand": fams.brand_of,
            "category": fams.cat_of,
            "attributes": [list(a.items()) for a in fams.attrs_of],
            "price": fams.price_of,
            "in_stock": [None] * len(fams.pid),
            "variant_group": [f"F{f:07d}" for f in fams.fam_of],
        },
        schema=PRODUCT_SCHEMA,
    )
    queries, judgments = _queries_and_judgments(rng, fams, num_queries, misspell_fraction)
    return SyntheticCatalog(
        products, queries, judgments,
        stats={"families": len(fams.products), "products": len(fams.pid),
               "queries": queries.num_rows, "judgments": judgments.num_rows},
    )


def _make_families(rng: np.random.Generator, num_products: int,
                   type_brands: list[list[str]]) -> _Families:
    """Products, one family at a time; every family has at least one variant. Types are cycled
    first so that every type exists even in a small catalog."""
    fams = _Families()
    family = 0
    while len(fams.pid) < num_products:
        t_idx = family if family < len(TYPES) else int(rng.integers(len(TYPES)))
        ptype = TYPES[t_idx]
        brand = type_brands[t_idx][int(rng.integers(6))]
        model_word = _MODEL_WORDS[int(rng.integers(len(_MODEL_WORDS)))]
        model = f"{model_word} {int(rng.integers(1, 10)) * 100}"
        fixed = {a: vals[int(rng.integers(len(vals)))] for a, vals in ptype.attrs.items()
                 if a not in ptype.variant_axes}
        axes = {a: ptype.attrs[a] for a in ptype.variant_axes}
        n_variants = int(min(num_products - len(fams.pid), rng.integers(1, 7) if axes else 1))
        seen: set[tuple[str, ...]] = set()
        base_price = float(rng.uniform(*ptype.price))
        members = []
        for _ in range(n_variants * 3):
            if len(members) == n_variants:
                break
            var = {a: vals[int(rng.integers(len(vals)))] for a, vals in axes.items()}
            key = tuple(var.values())
            if key in seen:
                continue
            seen.add(key)
            members.append(len(fams.pid))
            _add_product(rng, fams, family, t_idx, brand, model, fixed, var, base_price)
        fams.products.append(members)
        fams.type.append(t_idx)
        fams.model.append(model)
        fams.brand.append(brand)
        family += 1
    return fams


def _add_product(rng: np.random.Generator, fams: _Families, family: int, t_idx: int,
                 brand: str, model: str, fixed: dict[str, str], var: dict[str, str],
                 base_price: float) -> None:
    ptype = TYPES[t_idx]
    attrs = fixed | var
    fams.pid.append(f"P{len(fams.pid) + 1:07d}")
    fams.fam_of.append(family)
    fams.type_of.append(t_idx)
    fams.attrs_of.append(attrs)
    fams.brand_of.append(brand)
    fams.cat_of.append(" > ".join((*ptype.path, ptype.name.title())))
    detail = ", ".join(var[a] for a in ptype.variant_axes)
    lead = [v.title() for a, v in fixed.items() if a in ("material", "power", "style")][:1]
    title = " ".join([brand, model, *lead, ptype.name.title()])
    fams.titles.append(f"{title}, {detail}" if detail else title)
    fams.price_of.append(round(base_price * float(rng.uniform(0.9, 1.15)), 2))
    use = ptype.uses[int(rng.integers(len(ptype.uses)))] if ptype.uses else "everyday use"
    fams.desc_of.append(
        f"The {brand} {model} {ptype.name} is built for {use}. "
        + " ".join(f"{k.capitalize()}: {v}." for k, v in attrs.items())
    )


def _relist(rng: np.random.Generator, fams: _Families, relist_fraction: float,
            num_products: int) -> None:
    """Relisted duplicates: a product of another family of the same type takes the title and
    attributes of this one (another id, another family): the title rule must catch it."""
    type_products: list[list[int]] = [[] for _ in TYPES]
    for i, t in enumerate(fams.type_of):
        type_products[t].append(i)
    n_relist = int(relist_fraction * num_products)
    for src in rng.choice(len(fams.pid), size=min(n_relist, len(fams.pid) // 2), replace=False):
        src = int(src)
        peers = type_products[fams.type_of[src]]
        dst = peers[int(rng.integers(len(peers)))]
        if fams.fam_of[dst] != fams.fam_of[src]:
            fams.titles[dst] = fams.titles[src]
            fams.attrs_of[dst] = dict(fams.attrs_of[src])
            fams.brand_of[dst] = fams.brand_of[src]


_LABEL_CAPS = {"Exact": 6, "Substitute": 5, "Complement": 3, "Irrelevant": 4}
_LABEL_GRADES = {"Exact": 3.0, "Substitute": 2.0, "Complement": 1.0, "Irrelevant": 0.0}


def _queries_and_judgments(rng: np.random.Generator, fams: _Families, num_queries: int,
                           misspell_fraction: float) -> tuple[pa.Table, pa.Table]:
    """Each query targets one product of a random family, states some of its attributes, and is
    judged over a pool the way annotators see one (labels by rule, capped per label)."""
    type_families = fams.members_of_type()
    type_of_arr = np.asarray(fams.type_of)
    q_ids, q_texts = [], []
    j_q, j_p, j_label = [], [], []
    for q in range(num_queries):
        fam = int(rng.integers(len(fams.products)))
        target = fams.products[fam][int(rng.integers(len(fams.products[fam])))]
        t_idx = fams.type[fam]
        text, constraints = _query_for(rng, TYPES[t_idx], fams.attrs_of[target], fams.brand[fam],
                                       fams.model[fam], misspell_fraction)
        qid = f"Q{q + 1:06d}"
        q_ids.append(qid)
        q_texts.append(text)
        pool = _judging_pool(rng, fams, fam, type_families, type_of_arr)
        by_label: dict[str, list[int]] = {}
        for i in dict.fromkeys(pool):  # ordered, unique
            by_label.setdefault(_label(fams, i, t_idx, constraints), []).append(i)
        for label, items in by_label.items():
            for i in items[: _LABEL_CAPS[label]]:
                j_q.append(qid)
                j_p.append(fams.pid[i])
                j_label.append(label)
    queries = pa.table({"query_id": q_ids, "text": q_texts}, schema=QUERY_SCHEMA)
    judgments = pa.table(
        {"query_id": j_q, "product_id": j_p, "grade": [_LABEL_GRADES[lb] for lb in j_label],
         "label": j_label},
        schema=JUDGMENT_SCHEMA,
    )
    return queries, judgments


def _label(fams: _Families, i: int, t_idx: int, constraints: dict[str, str]) -> str:
    """ESCI label of product ``i`` for a query on type ``t_idx`` stating ``constraints``."""
    if fams.type_of[i] == t_idx:
        ok = all(
            (fams.brand_of[i] == v) if a == "brand" else
            (fams.model[fams.fam_of[i]] == v) if a == "model" else
            (fams.attrs_of[i].get(a) == v)
            for a, v in constraints.items()
        )
        return "Exact" if ok else "Substitute"
    if TYPES[fams.type_of[i]].name in TYPES[t_idx].complements:
        return "Complement"
    return "Irrelevant"


def _judging_pool(rng: np.random.Generator, fams: _Families, fam: int,
                  type_families: list[list[int]], type_of_arr: np.ndarray) -> list[int]:
    """The target family, same-type products, complements, and some irrelevant ones (a few
    from the same department: hard ones)."""
    t_idx = fams.type[fam]
    ptype = TYPES[t_idx]
    pool: list[int] = list(fams.products[fam])
    same = type_families[t_idx]
    for f in rng.choice(same, size=min(len(same), 12), replace=False):
        members = fams.products[int(f)]
        pool.append(members[int(rng.integers(len(members)))])
    for comp in ptype.complements[:3]:
        comp_fams = type_families[TYPE_INDEX[comp]]
        for f in rng.choice(comp_fams, size=min(len(comp_fams), 2), replace=False):
            pool.append(fams.products[int(f)][0])
    dept = [i for i, t in enumerate(TYPES) if t.path[0] == ptype.path[0] and i != t_idx
            and TYPES[i].name not in ptype.complements
            and type_families[i]]  # a small catalog may not reach every type
    if dept:
        dept_fams = type_families[int(rng.choice(dept))]
        pool.append(fams.products[int(rng.choice(dept_fams))][0])
    pool.extend(int(i) for i in rng.choice(len(fams.pid), size=3, replace=False)
                if type_of_arr[int(i)] != t_idx)
    return pool


def _query_for(
    rng: np.random.Generator,
    ptype: ProductType,
    attrs: dict[str, str],
    brand: str,
    model: str,
    misspell_fraction: float,
) -> tuple[str, dict[str, str]]:
    """A shopper's query for one product, and the constraints it states."""
    use_synonym = rng.random() >= 0.6 and ptype.synonyms
    name = str(rng.choice(ptype.synonyms)) if use_synonym else ptype.name
    style = int(rng.integers(0, 7))
    constraints: dict[str, str] = {}
    if style == 0:
        text = name
    elif style == 1 and "colour" in attrs:
        constraints["colour"] = attrs["colour"]
        text = f"{attrs['colour']} {name}"
    elif style == 2:
        constraints["brand"] = brand
        text = f"{brand.lower()} {name}"
    elif style == 3:
        constraints["brand"], constraints["model"] = brand, model
        text = f"{brand.lower()} {model.lower()}"
        if rng.random() < 0.5:
            text += f" {name}"
    elif style == 4 and ptype.uses:
        text = f"{name} for {rng.choice(ptype.uses)}"
    elif style == 5:
        text = str(rng.choice(_COLLOQUIAL)).format(name)
    else:
        key = str(rng.choice(list(attrs)))
        constraints[key] = attrs[key]
        value = attrs[key].lower()
        text = f"{name} {value}" if rng.random() < 0.5 else f"{value} {name}"
    if rng.random() < misspell_fraction:
        words = text.split()
        k = int(np.argmax([len(w) for w in words]))
        words[k] = _misspell(rng, words[k])
        text = " ".join(words)
    return text, constraints
