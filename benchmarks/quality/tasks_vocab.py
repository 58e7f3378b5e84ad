"""Word lists for the task generators: common, lowercase, regular (no irregular plurals, no silent-h or
"you"-sounding vowels, so ``a``/``an`` and plural rules hold)."""

FIRST_NAMES = (
    "ana ben carla david elena felix grace hugo irene jonas karen leo maria nina omar paula "
    "rosa samuel tara victor wendy yusuf zoe adam bianca carlos diana emil fatima george hannah "
    "ivan julia kevin lucia marco nora oscar petra ruben sofia"
).title().split()

LAST_NAMES = (
    "fischer lopez novak smith garcia kim silva rossi berg costa meyer nguyen patel moreau "
    "jensen dubois santos keller ward walsh brandt okafor sato lind romero weber haas ortiz "
    "park moreno hill stone baker fox grant lane shaw price young"
).title().split()

CITIES = (
    "Oslo Lisbon Madrid Berlin Vienna Prague Dublin Paris Rome Athens Warsaw Lima Quito Cairo Nairobi Tokyo "
    "Seoul Hanoi Delhi Dhaka Sydney Perth Toronto Denver Austin Boston Chicago Seattle Bogota Santiago Helsinki "
    "Riga Zagreb Porto Munich Lyon Milan Krakow Geneva Bergen"
).split()

JOBS = (
    "nurse teacher baker pilot farmer plumber lawyer painter dentist chemist architect engineer editor "
    "gardener librarian carpenter tailor jeweler surgeon butcher translator designer mechanic firefighter "
    "electrician photographer accountant journalist florist optician"
).split()

COLORS = "red blue green yellow black white orange purple brown gray pink silver".split()

NOUNS = (
    "apple table river stone garden window bottle pencil basket candle mirror ladder bridge island "
    "forest castle rocket planet engine wallet jacket blanket kettle button ticket guitar camera lamp "
    "book chair door house tree road cloud field horse tiger rabbit monkey eagle shark whale spider "
    "box fox bench brush glass bus city berry key toy day dish church watch coin shell boat train "
    "drum flag hat map ring sock tent van wagon kite bell bird cake desk farm gate hill jar lake "
    "nest owl pear plum rose seed ship star tower village wheel cup egg ant arrow oven orange "
    "anchor album elbow ink insect onion"
).split()

ADJECTIVES = (
    "red blue green small large old young quick slow quiet loud bright dark soft hard warm cold "
    "tall short heavy light happy empty full clean dirty fresh round sharp smooth rough sweet "
    "ancient easy odd orange angry early icy"
).split()

VERBS = "runs jumps sings reads writes sleeps walks swims paints cooks climbs dances waits smiles builds".split()

CATEGORIES = {
    "fruit": "apple pear plum banana cherry mango grape lemon peach melon kiwi lime".split(),
    "animal": "horse tiger rabbit monkey eagle shark whale wolf fox owl goat camel".split(),
    "tool": "hammer wrench saw drill chisel shovel pliers rake axe screwdriver ladder spade".split(),
    "vehicle": "car bus train truck bicycle boat tram scooter van ship taxi rocket".split(),
    "instrument": "guitar piano violin drum flute trumpet harp cello banjo oboe organ tuba".split(),
    "clothing": "jacket shirt sock hat scarf glove coat skirt dress boot sweater belt".split(),
}

ANTONYMS = dict(
    pair.split(":")
    for pair in (
        "hot:cold big:small fast:slow happy:sad early:late light:dark open:closed full:empty "
        "high:low hard:soft loud:quiet rich:poor young:old strong:weak wet:dry thick:thin "
        "long:short wide:narrow clean:dirty first:last up:down inside:outside "
        "push:pull buy:sell win:lose begin:end true:false left:right north:south day:night "
        "before:after above:below friend:enemy sharp:dull sweet:sour brave:afraid"
    ).split()
)
