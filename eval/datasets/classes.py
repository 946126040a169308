"""Class names and label hierarchies, kept as data.

COCO-Stuff (Caesar et al., CVPR 2018): the 182 fine classes of the official label list
(github nightrome/cocostuff ``labels.txt``, ids 1..182; the ``stuffthingmaps`` PNGs store
``id - 1``, so the index space here is 0..181 and 255 is "unlabeled").  Each entry carries its
supercategory: thing supercategories from the COCO instance annotations (``instances_*.json``),
stuff supercategories from the COCO-Stuff annotations (``stuff_*.json``).  The 11 thing ids that
COCO defines but never annotates are marked ``None`` (their supercategory would be the one in the
COCO 2014 paper, but no pixel carries them, so the loaders map them to ignore).

The 27 coarse classes are ordered as in the unsupervised-segmentation literature (PiCIE, Cho et al.
CVPR 2021; STEGO, Hamilton et al. ICLR 2022, ``fine_to_coarse`` in ``data.py``; the official
DiffSeg notebook loads the same table from PiCIE's ``fine_to_coarse_dict.pickle``): the 12 thing
supercategories, then the 15 stuff supercategories.
"""

from __future__ import annotations

# (fine name, supercategory) for stuffthingmaps values 0..181; supercategory None: id unused.
COCO_STUFF_FINE: tuple[tuple[str, str | None], ...] = (
    ("person", "person"),
    ("bicycle", "vehicle"),
    ("car", "vehicle"),
    ("motorcycle", "vehicle"),
    ("airplane", "vehicle"),
    ("bus", "vehicle"),
    ("train", "vehicle"),
    ("truck", "vehicle"),
    ("boat", "vehicle"),
    ("traffic light", "outdoor"),
    ("fire hydrant", "outdoor"),
    ("street sign", None),
    ("stop sign", "outdoor"),
    ("parking meter", "outdoor"),
    ("bench", "outdoor"),
    ("bird", "animal"),
    ("cat", "animal"),
    ("dog", "animal"),
    ("horse", "animal"),
    ("sheep", "animal"),
    ("cow", "animal"),
    ("elephant", "animal"),
    ("bear", "animal"),
    ("zebra", "animal"),
    ("giraffe", "animal"),
    ("hat", None),
    ("backpack", "accessory"),
    ("umbrella", "accessory"),
    ("shoe", None),
    ("eye glasses", None),
    ("handbag", "accessory"),
    ("tie", "accessory"),
    ("suitcase", "accessory"),
    ("frisbee", "sports"),
    ("skis", "sports"),
    ("snowboard", "sports"),
    ("sports ball", "sports"),
    ("kite", "sports"),
    ("baseball bat", "sports"),
    ("baseball glove", "sports"),
    ("skateboard", "sports"),
    ("surfboard", "sports"),
    ("tennis racket", "sports"),
    ("bottle", "kitchen"),
    ("plate", None),
    ("wine glass", "kitchen"),
    ("cup", "kitchen"),
    ("fork", "kitchen"),
    ("knife", "kitchen"),
    ("spoon", "kitchen"),
    ("bowl", "kitchen"),
    ("banana", "food"),
    ("apple", "food"),
    ("sandwich", "food"),
    ("orange", "food"),
    ("broccoli", "food"),
    ("carrot", "food"),
    ("hot dog", "food"),
    ("pizza", "food"),
    ("donut", "food"),
    ("cake", "food"),
    ("chair", "furniture"),
    ("couch", "furniture"),
    ("potted plant", "furniture"),
    ("bed", "furniture"),
    ("mirror", None),
    ("dining table", "furniture"),
    ("window", None),
    ("desk", None),
    ("toilet", "furniture"),
    ("door", None),
    ("tv", "electronic"),
    ("laptop", "electronic"),
    ("mouse", "electronic"),
    ("remote", "electronic"),
    ("keyboard", "electronic"),
    ("cell phone", "electronic"),
    ("microwave", "appliance"),
    ("oven", "appliance"),
    ("toaster", "appliance"),
    ("sink", "appliance"),
    ("refrigerator", "appliance"),
    ("blender", None),
    ("book", "indoor"),
    ("clock", "indoor"),
    ("vase", "indoor"),
    ("scissors", "indoor"),
    ("teddy bear", "indoor"),
    ("hair drier", "indoor"),
    ("toothbrush", "indoor"),
    ("hair brush", None),
    ("banner", "textile"),
    ("blanket", "textile"),
    ("branch", "plant"),
    ("bridge", "building"),
    ("building-other", "building"),
    ("bush", "plant"),
    ("cabinet", "furniture-stuff"),
    ("cage", "structural"),
    ("cardboard", "raw-material"),
    ("carpet", "floor"),
    ("ceiling-other", "ceiling"),
    ("ceiling-tile", "ceiling"),
    ("cloth", "textile"),
    ("clothes", "textile"),
    ("clouds", "sky"),
    ("counter", "furniture-stuff"),
    ("cupboard", "furniture-stuff"),
    ("curtain", "textile"),
    ("desk-stuff", "furniture-stuff"),
    ("dirt", "ground"),
    ("door-stuff", "furniture-stuff"),
    ("fence", "structural"),
    ("floor-marble", "floor"),
    ("floor-other", "floor"),
    ("floor-stone", "floor"),
    ("floor-tile", "floor"),
    ("floor-wood", "floor"),
    ("flower", "plant"),
    ("fog", "water"),
    ("food-other", "food-stuff"),
    ("fruit", "food-stuff"),
    ("furniture-other", "furniture-stuff"),
    ("grass", "plant"),
    ("gravel", "ground"),
    ("ground-other", "ground"),
    ("hill", "solid"),
    ("house", "building"),
    ("leaves", "plant"),
    ("light", "furniture-stuff"),
    ("mat", "textile"),
    ("metal", "raw-material"),
    ("mirror-stuff", "furniture-stuff"),
    ("moss", "plant"),
    ("mountain", "solid"),
    ("mud", "ground"),
    ("napkin", "textile"),
    ("net", "structural"),
    ("paper", "raw-material"),
    ("pavement", "ground"),
    ("pillow", "textile"),
    ("plant-other", "plant"),
    ("plastic", "raw-material"),
    ("platform", "ground"),
    ("playingfield", "ground"),
    ("railing", "structural"),
    ("railroad", "ground"),
    ("river", "water"),
    ("road", "ground"),
    ("rock", "solid"),
    ("roof", "building"),
    ("rug", "textile"),
    ("salad", "food-stuff"),
    ("sand", "ground"),
    ("sea", "water"),
    ("shelf", "furniture-stuff"),
    ("sky-other", "sky"),
    ("skyscraper", "building"),
    ("snow", "ground"),
    ("solid-other", "solid"),
    ("stairs", "furniture-stuff"),
    ("stone", "solid"),
    ("straw", "plant"),
    ("structural-other", "structural"),
    ("table", "furniture-stuff"),
    ("tent", "building"),
    ("textile-other", "textile"),
    ("towel", "textile"),
    ("tree", "plant"),
    ("vegetable", "food-stuff"),
    ("wall-brick", "wall"),
    ("wall-concrete", "wall"),
    ("wall-other", "wall"),
    ("wall-panel", "wall"),
    ("wall-stone", "wall"),
    ("wall-tile", "wall"),
    ("wall-wood", "wall"),
    ("water-other", "water"),
    ("waterdrops", "water"),
    ("window-blind", "window"),
    ("window-other", "window"),
    ("wood", "solid"),
)

# The stuffthingmaps values below this are things, the rest stuff (COCO ids 1..91 vs 92..182).
COCO_FIRST_STUFF = 91

# Thing supercategories share the names "food" and "furniture" with stuff ones in spirit; the
# coarse names keep them apart the way the literature's tables do.
COCO_STUFF27_CLASSES: tuple[str, ...] = (
    "electronic",
    "appliance",
    "food-things",
    "furniture-things",
    "indoor",
    "kitchen",
    "accessory",
    "animal",
    "outdoor",
    "person",
    "sports",
    "vehicle",
    "ceiling",
    "floor",
    "food-stuff",
    "furniture-stuff",
    "raw-material",
    "textile",
    "wall",
    "window",
    "building",
    "ground",
    "plant",
    "sky",
    "solid",
    "structural",
    "water",
)

# Supercategory as written in the COCO / COCO-Stuff annotations -> coarse class name.
_SUPER_TO_COARSE = {"food": "food-things", "furniture": "furniture-things"}


def coco_fine_to_coarse() -> dict[int, int]:
    """Fine stuffthingmaps value (0..181, used ids only) -> coarse class index (0..26)."""
    index = {name: i for i, name in enumerate(COCO_STUFF27_CLASSES)}
    return {
        fine: index[_SUPER_TO_COARSE.get(sup, sup)]
        for fine, (_, sup) in enumerate(COCO_STUFF_FINE)
        if sup is not None
    }


# The 80 annotated COCO thing classes in COCO id order (background is class 0 in coco_object).
COCO_THING_CLASSES: tuple[str, ...] = tuple(
    name for name, sup in COCO_STUFF_FINE[:COCO_FIRST_STUFF] if sup is not None
)
COCO_OBJECT_CLASSES: tuple[str, ...] = ("background", *COCO_THING_CLASSES)

# Cityscapes labelIds 7..33 in id order (cityscapesScripts ``helpers/labels.py``).
CITYSCAPES27_CLASSES: tuple[str, ...] = (
    "road",
    "sidewalk",
    "parking",
    "rail track",
    "building",
    "wall",
    "fence",
    "guard rail",
    "bridge",
    "tunnel",
    "pole",
    "polegroup",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "caravan",
    "trailer",
    "train",
    "motorcycle",
    "bicycle",
)

# ADE20K SceneParsing (ADEChallengeData2016 ``objectInfo150``), as in mmseg ``ADE20KDataset``.
ADE20K_CLASSES: tuple[str, ...] = tuple(
    """wall|building|sky|floor|tree|ceiling|road|bed|windowpane|grass|cabinet|sidewalk|person|earth|
door|table|mountain|plant|curtain|chair|car|water|painting|sofa|shelf|house|sea|mirror|rug|field|
armchair|seat|fence|desk|rock|wardrobe|lamp|bathtub|railing|cushion|base|box|column|signboard|
chest of drawers|counter|sand|sink|skyscraper|fireplace|refrigerator|grandstand|path|stairs|runway|
case|pool table|pillow|screen door|stairway|river|bridge|bookcase|blind|coffee table|toilet|flower|
book|hill|bench|countertop|stove|palm|kitchen island|computer|swivel chair|boat|bar|arcade machine|
hovel|bus|towel|light|truck|tower|chandelier|awning|streetlight|booth|television receiver|airplane|
dirt track|apparel|pole|land|bannister|escalator|ottoman|bottle|buffet|poster|stage|van|ship|
fountain|conveyer belt|canopy|washer|plaything|swimming pool|stool|barrel|basket|waterfall|tent|bag|
minibike|cradle|oven|ball|food|step|tank|trade name|microwave|pot|animal|bicycle|lake|dishwasher|
screen|blanket|sculpture|hood|sconce|vase|traffic light|tray|ashcan|fan|pier|crt screen|plate|
monitor|bulletin board|shower|radiator|glass|clock|flag""".replace("\n", "").split("|")
)

# PASCAL VOC 2012 segmentation classes, background first (devkit ``VOCcode/VOCinit.m``).
VOC_CLASSES: tuple[str, ...] = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)

# Pascal Context 59 (Mottaghi et al. CVPR 2014): name of label value k + 1 at index k. The
# converters that write the label maps (mmseg tools/dataset_converters/pascal_context.py, and
# FC-CLIP's/ODISE's prepare_pascal_ctx_sem_seg.py, which DiffCut uses) keep 59 of the 459 original
# (Detail API) ids and number them 1..59 in *sorted id* order, and the original list is
# alphabetical, so the values follow the alphabet: mmseg's PascalContextDataset59. The older
# VOC-first order (the first mmseg PascalContextDataset, DiffCut's id2label) names the wrong
# values; Hungarian matching makes scores independent of names, per-class tables are not.
PASCAL_CONTEXT59_CLASSES: tuple[str, ...] = (
    "aeroplane",
    "bag",
    "bed",
    "bedclothes",
    "bench",
    "bicycle",
    "bird",
    "boat",
    "book",
    "bottle",
    "building",
    "bus",
    "cabinet",
    "car",
    "cat",
    "ceiling",
    "chair",
    "cloth",
    "computer",
    "cow",
    "cup",
    "curtain",
    "dog",
    "door",
    "fence",
    "floor",
    "flower",
    "food",
    "grass",
    "ground",
    "horse",
    "keyboard",
    "light",
    "motorbike",
    "mountain",
    "mouse",
    "person",
    "plate",
    "platform",
    "pottedplant",
    "road",
    "rock",
    "sheep",
    "shelves",
    "sidewalk",
    "sign",
    "sky",
    "snow",
    "sofa",
    "table",
    "track",
    "train",
    "tree",
    "truck",
    "tvmonitor",
    "wall",
    "water",
    "window",
    "wood",
)

# Thing classes, where a dataset defines the thing/stuff split (every other class is stuff); the
# rescoring reports mIoU over each part. COCO-Stuff-27: the 12 thing supercategories come first
# (PiCIE / STEGO order, above). Cityscapes: the classes with ``hasInstances=True`` in
# cityscapesScripts ``helpers/labels.py`` (categories human and vehicle). Datasets not listed
# (ADE20K, Pascal Context, VOC, COCO-Object, synthetic) get no split.
THING_CLASSES: dict[str, tuple[str, ...]] = {
    "coco_stuff27": COCO_STUFF27_CLASSES[:12],
    "cityscapes": CITYSCAPES27_CLASSES[CITYSCAPES27_CLASSES.index("person") :],
}
