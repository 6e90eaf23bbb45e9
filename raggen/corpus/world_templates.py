"""Vocabulary and sentence templates of the generated world (see ``world.py``).

Kept apart from the generator so the wording can be read and changed in one place. Rules the
templates follow (``tests/unit/test_world.py`` checks them):

- passage templates (how a fact is *stated*) and question templates (how it is *asked*) use
  different wording, so a question never repeats its passage's sentence;
- every fact template holds ``{v}`` exactly once, and the value is a plain span (no article);
- filler templates reuse the attribute vocabulary (``{year}``, ``{instrument}``, ...) for things
  that are *not* facts of the entity, so that the reader must find the relation, not the word;
- no value of a pool is a whole word inside another value of any pool.

Slots: ``{name}`` the entity's name; ``{subj}``/``{Subj}`` a subject (the name or a pronoun),
``{poss}``/``{Poss}`` its possessive, ``{pron}`` a lower-case possessive pronoun (his/her/its);
``{a}`` the article for ``{v}`` (a/an).
"""

from __future__ import annotations

# --------------------------------------------------------------------------- name syllables
# Pronounceable but invented: MiniLM's WordPiece splits nearly all of them into 2-4 pieces.

ONSETS_FIRST = [
    "b",
    "br",
    "d",
    "dr",
    "f",
    "g",
    "gr",
    "h",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "th",
    "tr",
    "v",
    "z",
    "sh",
    "j",
    "c",
    "fl",
    "gl",
    "st",
    "kr",
    "vr",
]
ONSETS_INNER = [
    "b",
    "d",
    "f",
    "g",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "z",
    "th",
    "sh",
    "ll",
    "rr",
    "nd",
    "rv",
    "lk",
]
VOWELS_FIRST = ["a", "e", "i", "o", "u", "ae", "ai", "ei", "y", "au"]
VOWELS_INNER = ["a", "e", "i", "o", "u", "a", "e", "o"]
CODAS = ["", "", "n", "r", "l", "s", "k", "th", "m", "x", "sk", "rn", "nt", "d"]
NAME_ENDINGS = ["a", "en", "el", "is", "o", "ar", "i"]  # look-alike variants of a name stem
TOWN_SUFFIXES = ["mere", "holt", "wick", "dale", "stead", "thorpe", "brook", "garth", "by", "ness"]
COMPANY_KINDS = [
    "Ironworks",
    "Mills",
    "Brewery",
    "Shipyards",
    "Tannery",
    "Ropeworks",
    "Glassworks",
    "Foundry",
    "Weavers",
    "Lantern Company",
    "Pottery",
    "Trading House",
    "Printworks",
    "Canning Company",
    "Clockworks",
]

# --------------------------------------------------------------------------- value pools

OCCUPATIONS = [
    "glassblower",
    "cartographer",
    "beekeeper",
    "bookbinder",
    "clockmaker",
    "cooper",
    "blacksmith",
    "stonemason",
    "weaver",
    "shipwright",
    "apothecary",
    "candlemaker",
    "saddler",
    "tanner",
    "potter",
    "locksmith",
    "lamplighter",
    "astronomer",
    "surveyor",
    "schoolteacher",
    "midwife",
    "miller",
    "baker",
    "shepherd",
    "chandler",
    "wheelwright",
    "engraver",
    "dyer",
    "tailor",
    "cobbler",
    "carpenter",
    "herbalist",
    "archivist",
    "bellfounder",
    "notary",
    "innkeeper",
    "falconer",
    "vintner",
    "glazier",
    "ferryman",
]
INSTRUMENTS = [
    "oboe",
    "lute",
    "cello",
    "harp",
    "flute",
    "bassoon",
    "clarinet",
    "viola",
    "fiddle",
    "zither",
    "dulcimer",
    "accordion",
    "trumpet",
    "trombone",
    "tuba",
    "bagpipes",
    "mandolin",
    "banjo",
    "ocarina",
    "sitar",
    "marimba",
    "xylophone",
    "cornet",
    "concertina",
    "euphonium",
]
COLOURS = [
    "crimson",
    "scarlet",
    "teal",
    "ochre",
    "violet",
    "indigo",
    "amber",
    "olive",
    "maroon",
    "turquoise",
    "lavender",
    "saffron",
    "cobalt",
    "emerald",
    "ivory",
    "charcoal",
    "magenta",
    "russet",
    "mauve",
    "vermilion",
    "azure",
    "chartreuse",
]
DISHES = [
    "pear cider",
    "salt cod",
    "plum dumplings",
    "smoked eel",
    "barley bread",
    "honey cakes",
    "onion soup",
    "goat cheese",
    "pickled herring",
    "chestnut porridge",
    "lamb stew",
    "apple fritters",
    "rye biscuits",
    "walnut pie",
    "mushroom pasties",
    "cherry wine",
    "fish chowder",
    "oat pancakes",
    "quince jelly",
    "spiced sausages",
    "crab pies",
    "blackberry tarts",
    "roast goose",
    "fig pudding",
    "leek broth",
]
PRODUCTS = [
    "copper kettles",
    "sailcloth",
    "clock springs",
    "wool blankets",
    "leather saddles",
    "glass lanterns",
    "iron nails",
    "candles",
    "barrels",
    "bricks",
    "ink",
    "compasses",
    "telescopes",
    "pocket watches",
    "tin buttons",
    "wooden toys",
    "fishing nets",
    "soap",
    "umbrellas",
    "bicycles",
    "roof tiles",
    "sewing needles",
    "printed maps",
    "steel scissors",
    "oil lamps",
    "porcelain cups",
    "linen shirts",
    "hunting knives",
    "silk ribbons",
    "brass bells",
]
POOLS = {"occupation": OCCUPATIONS, "instrument": INSTRUMENTS, "colour": COLOURS, "dish": DISHES, "product": PRODUCTS}

# --------------------------------------------------------------------------- attributes
# kind -> attribute -> value type. Value types: a pool name, "year", or an entity/name kind.

ATTRIBUTES = {
    "person": {
        "birth_year": "year",
        "home_town": "town",
        "occupation": "occupation",
        "instrument": "instrument",
        "favourite_colour": "colour",
        "employer": "company",
    },
    "town": {"river": "river", "founded_year": "year", "province": "province", "mayor": "person", "dish": "dish"},
    "company": {
        "founder": "person",
        "established_year": "year",
        "headquarters": "town",
        "product": "product",
        "logo_colour": "colour",
    },
}
YEAR_RANGES = {"birth_year": (1790, 1990), "founded_year": (1050, 1890), "established_year": (1780, 1990)}

# --------------------------------------------------------------------------- passage templates

FACT_TEMPLATES = {
    "birth_year": [
        "{Subj} was born in {v}.",
        "{Subj} came into the world in {v}, during a hard winter.",
        "Parish records give {v} as the year of {poss} birth.",
        "{Poss} birth, in {v}, was noted in the town ledger.",
    ],
    "home_town": [
        "{Subj} grew up in {v}.",
        "{Poss} childhood was spent in the town of {v}.",
        "{Subj} has always called {v} home.",
        "{Subj} lives in {v}, not far from the market square.",
    ],
    "occupation": [
        "{Subj} works as {a} {v}.",
        "By trade, {subj} is {a} {v}.",
        "{Subj} earns a living as {a} {v}.",
        "For many years {subj} has made a living as {a} {v}.",
    ],
    "instrument": [
        "{Subj} plays the {v}.",
        "In the evenings {subj} practises the {v}.",
        "{Subj} is known locally for playing the {v} at weddings.",
        "{Poss} instrument of choice is the {v}.",
    ],
    "favourite_colour": [
        "{Poss} favourite colour is {v}.",
        "{Subj} likes {v} more than any other colour.",
        "{Subj} painted the front door {v}, {pron} favourite colour.",
        "Of all colours, {subj} is fondest of {v}.",
    ],
    "employer": [
        "{Subj} is employed by {v}.",
        "{Subj} has a position at {v}.",
        "{Subj} took a post with {v} and stayed there.",
        "Every weekday {subj} goes to work at {v}.",
    ],
    "river": [
        "{Subj} lies on the banks of the {v} River.",
        "The {v} River runs through the middle of {subj}.",
        "{Subj} was built where the river {v} bends to the east.",
    ],
    "founded_year": [
        "{Subj} was founded in {v}.",
        "Settlers established {subj} in {v}.",
        "The first houses of {subj} were built in {v}.",
    ],
    "province": [
        "{Subj} is a town in the province of {v}.",
        "{Subj} belongs to the province of {v}.",
        "{Subj} sits in {v} province.",
    ],
    "mayor": [
        "{v} serves as mayor of {subj}.",
        "The townsfolk elected {v} as their mayor.",
        "{Subj} is governed by its mayor, {v}.",
    ],
    "dish": [
        "{Subj} is famous for its {v}.",
        "Visitors to {subj} are always offered {v}.",
        "The local speciality of {subj} is {v}.",
    ],
    "founder": [
        "{Subj} was founded by {v}.",
        "{v} started {subj} with borrowed money.",
        "{Subj} owes its existence to its founder, {v}.",
    ],
    "established_year": [
        "{Subj} opened its doors in {v}.",
        "{Subj} was set up in {v}.",
        "The firm dates from {v}.",
    ],
    "headquarters": [
        "{Subj} has its headquarters in {v}.",
        "The head office of {subj} is in {v}.",
        "{Subj} is run from offices in {v}.",
    ],
    "product": [
        "{Subj} makes {v}.",
        "{Subj} is best known for its {v}.",
        "The main product of {subj} is {v}.",
        "{Subj} sells {v} to customers across the province.",
    ],
    "logo_colour": [
        "The logo of {subj} is {v}.",
        "{Subj} paints its delivery carts {v}, the colour of its logo.",
        "{Poss} emblem is printed in {v}.",
    ],
}

# --------------------------------------------------------------------------- question templates

QUESTION_TEMPLATES = {
    "birth_year": ["In what year was {name} born?", "What is the birth year of {name}?", "When was {name} born?"],
    "home_town": [
        "What is the home town of {name}?",
        "Which town does {name} come from?",
        "In which town was {name} raised?",
    ],
    "occupation": [
        "What is the occupation of {name}?",
        "What does {name} do for a living?",
        "What job does {name} have?",
        "What is the profession of {name}?",
    ],
    "instrument": [
        "Which instrument does {name} play?",
        "What musical instrument is {name} known to play?",
        "What instrument is played by {name}?",
    ],
    "favourite_colour": [
        "What is the favourite colour of {name}?",
        "Which colour does {name} like best?",
        "What colour does {name} prefer?",
    ],
    "employer": [
        "Which company employs {name}?",
        "For which firm does {name} work?",
        "At which company does {name} have a job?",
    ],
    "river": [
        "Which river flows through {name}?",
        "What is the name of the river at {name}?",
        "On what river is {name} located?",
    ],
    "founded_year": [
        "In what year was the town of {name} founded?",
        "When was {name} first settled?",
        "What year did {name} get its start as a town?",
    ],
    "province": [
        "In which province is {name}?",
        "Which province contains the town of {name}?",
        "What province is {name} part of?",
    ],
    "mayor": [
        "Who leads the town council of {name}?",
        "Who holds the office of mayor in {name}?",
        "Who is {name}'s mayor?",
    ],
    "dish": [
        "What food is {name} known for?",
        "Which dish is {name} famous for?",
        "What is the traditional dish of {name}?",
    ],
    "founder": ["Who founded {name}?", "Who established the company {name}?", "Who is the founder of {name}?"],
    "established_year": [
        "In what year was {name} established?",
        "When did {name} begin trading?",
        "What is the founding year of {name}?",
    ],
    "headquarters": [
        "Where is {name} headquartered?",
        "In which town does {name} have its main office?",
        "Which town is home to the company {name}?",
    ],
    "product": ["What does {name} produce?", "What is {name}'s main product?", "What goods are made by {name}?"],
    "logo_colour": [
        "What colour does {name} use for its logo?",
        "In which colour is {name}'s logo?",
        "What is the colour of {name}'s emblem?",
    ],
}

# --------------------------------------------------------------------------- other sentences

INTRO_TEMPLATES = {
    "person": [
        "{name} is remembered by neighbours as a patient and careful person.",
        "{name} is a member of a large and quarrelsome family.",
        "Few people in the valley are as well known as {name}.",
        "{name} keeps a small garden and a large library.",
    ],
    "town": [
        "{name} is a small town surrounded by orchards and low hills.",
        "{name} is a market town with narrow streets and slate roofs.",
        "Travellers often pass through {name} on the old coast road.",
        "{name} is a quiet town with a stone bridge and a clock tower.",
    ],
    "company": [
        "{name} is a family business with a long history.",
        "{name} is a firm with workshops, warehouses and a loyal staff.",
        "Many people in the region have worked for {name} at some point.",
        "{name} is a company that grew from a single workshop.",
    ],
}
CONTINUATION_TEMPLATES = {
    "person": [
        "More is known about the later life of {name}.",
        "Letters written by {name} survive in a family archive.",
        "Other records about {name} tell a fuller story.",
    ],
    "town": [
        "The history of {name} is recorded in the town chronicle.",
        "Older residents of {name} still tell stories about the place.",
        "A guidebook describes {name} in some detail.",
    ],
    "company": [
        "The account books of {name} have been kept since the beginning.",
        "A short history of {name} was printed for its staff.",
        "Former workers describe {name} with fondness.",
    ],
}
# Distractor sentences: attribute vocabulary that is not a fact of the entity. Slots name a value
# type; the generator fills them with values different from the passage's facts.
FILLER_TEMPLATES = {
    "person": [
        "{Pron} cousin is {a_occupation} {occupation} in {town}.",
        "{Pron} brother once tried to learn the {instrument} but gave up.",
        "A neighbour who plays the {instrument} often visits from {town}.",
        "In {year} {subj} travelled to {town} to visit relatives.",
        "{Subj} has a friend who works at {company}.",
        "{Subj} rarely wears {colour}, a colour {pron} sister adores.",
        "On holidays {subj} eats {dish} with {person}.",
        "{Subj} once bought {product} from a pedlar.",
        "Some say {subj} was seen in {town} in {year}, though nobody can be sure.",
        "{Subj} enjoys long walks along the river in the evening.",
        "{Pron} grandmother was {a_occupation} {occupation}.",
    ],
    "town": [
        "The road from {subj} leads on to {town}.",
        "Traders from {company} visit {subj} every spring.",
        "A bridge over the {river} River lies a day's walk away.",
        "An old stone chapel, rebuilt in {year}, stands near the square.",
        "Travellers from {province} pass through on their way to the coast.",
        "The market sells {dish} brought in from neighbouring towns.",
        "{person} once gave a speech in the square.",
        "A famous {occupation} opened a shop there in {year}.",
        "The church bells were painted {colour} for a festival.",
        "Many houses have gardens that run down to the water.",
    ],
    "company": [
        "In {year} it opened a second workshop in {town}.",
        "A rival firm makes {product}.",
        "One of its first customers was {person}.",
        "Its clerks, many of them from {town}, wear {colour} aprons.",
        "Prices were raised in {year} after a poor harvest.",
        "The staff canteen serves {dish} on Fridays.",
        "A retired {occupation} still keeps the accounts.",
        "Its workers once formed a band with {a_instrument} {instrument} and two drums.",
        "It buys supplies from {company}.",
        "The workshops are busy from dawn until late at night.",
    ],
}
PRONOUNS = {  # kind or gender -> (subject, possessive)
    "she": ("she", "her"),
    "he": ("he", "his"),
    "town": ("the town", "its"),
    "company": ("the company", "its"),
}
