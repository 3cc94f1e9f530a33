"""A parallel phrase list (English, French, German, Spanish, Italian) written for this project.

Used for language identification and speech translation (espeak-ng speaks each language).
Lower case, no punctuation, so the targets are exact. Each row: en | fr | de | es | it.
"""

from __future__ import annotations

LANGS = ("en", "fr", "de", "es", "it")
LANG_NAMES = {"en": "English", "fr": "French", "de": "German", "es": "Spanish", "it": "Italian"}
# espeak-ng voice names of each language
ESPEAK_VOICE = {"en": "en-us", "fr": "fr", "de": "de", "es": "es", "it": "it"}

_ROWS = """
good morning | bonjour | guten morgen | buenos días | buongiorno
good night | bonne nuit | gute nacht | buenas noches | buona notte
thank you very much | merci beaucoup | vielen dank | muchas gracias | grazie mille
where is the station | où est la gare | wo ist der bahnhof | dónde está la estación | dov'è la stazione
i would like a coffee | je voudrais un café | ich möchte einen kaffee | quisiera un café | vorrei un caffè
the weather is nice today | il fait beau aujourd'hui | das wetter ist heute schön | hace buen tiempo hoy | oggi fa bel tempo
how are you | comment allez vous | wie geht es dir | cómo estás | come stai
i do not understand | je ne comprends pas | ich verstehe nicht | no entiendo | non capisco
the cat is sleeping | le chat dort | die katze schläft | el gato está durmiendo | il gatto dorme
i am hungry | j'ai faim | ich habe hunger | tengo hambre | ho fame
where are you from | d'où venez vous | woher kommst du | de dónde eres | di dove sei
the book is on the table | le livre est sur la table | das buch liegt auf dem tisch | el libro está en la mesa | il libro è sul tavolo
i love music | j'aime la musique | ich liebe musik | me encanta la música | amo la musica
the train is late | le train est en retard | der zug hat verspätung | el tren llega tarde | il treno è in ritardo
my name is anna | je m'appelle anna | ich heiße anna | me llamo anna | mi chiamo anna
see you tomorrow | à demain | bis morgen | hasta mañana | a domani
the water is cold | l'eau est froide | das wasser ist kalt | el agua está fría | l'acqua è fredda
open the window please | ouvre la fenêtre s'il te plaît | öffne bitte das fenster | abre la ventana por favor | apri la finestra per favore
i have two brothers | j'ai deux frères | ich habe zwei brüder | tengo dos hermanos | ho due fratelli
the house is very big | la maison est très grande | das haus ist sehr groß | la casa es muy grande | la casa è molto grande
what time is it | quelle heure est il | wie spät ist es | qué hora es | che ore sono
we are going to the beach | nous allons à la plage | wir gehen zum strand | vamos a la playa | andiamo al mare
the children are playing | les enfants jouent | die kinder spielen | los niños están jugando | i bambini giocano
i need a doctor | j'ai besoin d'un médecin | ich brauche einen arzt | necesito un médico | ho bisogno di un medico
the shop is closed | le magasin est fermé | der laden ist geschlossen | la tienda está cerrada | il negozio è chiuso
how much does it cost | combien ça coûte | wie viel kostet das | cuánto cuesta | quanto costa
i live in a small town | j'habite dans une petite ville | ich wohne in einer kleinen stadt | vivo en un pueblo pequeño | vivo in una piccola città
the dog is running in the park | le chien court dans le parc | der hund läuft im park | el perro corre en el parque | il cane corre nel parco
please speak slowly | parlez lentement s'il vous plaît | bitte sprechen sie langsam | hable despacio por favor | parli lentamente per favore
the sun is shining | le soleil brille | die sonne scheint | el sol brilla | il sole splende
i am reading a book | je lis un livre | ich lese ein buch | estoy leyendo un libro | sto leggendo un libro
my sister is a teacher | ma sœur est professeur | meine schwester ist lehrerin | mi hermana es profesora | mia sorella è insegnante
the car is red | la voiture est rouge | das auto ist rot | el coche es rojo | la macchina è rossa
we eat at seven | nous mangeons à sept heures | wir essen um sieben | comemos a las siete | mangiamo alle sette
it is raining | il pleut | es regnet | está lloviendo | piove
the milk is in the fridge | le lait est dans le frigo | die milch ist im kühlschrank | la leche está en la nevera | il latte è nel frigo
i like to swim | j'aime nager | ich schwimme gern | me gusta nadar | mi piace nuotare
where is the bathroom | où sont les toilettes | wo ist die toilette | dónde está el baño | dov'è il bagno
the bread is fresh | le pain est frais | das brot ist frisch | el pan está fresco | il pane è fresco
my father works in a bank | mon père travaille dans une banque | mein vater arbeitet in einer bank | mi padre trabaja en un banco | mio padre lavora in una banca
the flowers are beautiful | les fleurs sont belles | die blumen sind schön | las flores son bonitas | i fiori sono belli
i lost my keys | j'ai perdu mes clés | ich habe meine schlüssel verloren | perdí mis llaves | ho perso le chiavi
the museum opens at nine | le musée ouvre à neuf heures | das museum öffnet um neun | el museo abre a las nueve | il museo apre alle nove
can you help me | pouvez vous m'aider | kannst du mir helfen | puedes ayudarme | puoi aiutarmi
the sea is calm | la mer est calme | das meer ist ruhig | el mar está tranquilo | il mare è calmo
i am tired | je suis fatigué | ich bin müde | estoy cansado | sono stanco
the room is too hot | la chambre est trop chaude | das zimmer ist zu heiß | la habitación está demasiado caliente | la stanza è troppo calda
we need more time | nous avons besoin de plus de temps | wir brauchen mehr zeit | necesitamos más tiempo | abbiamo bisogno di più tempo
the bird is singing | l'oiseau chante | der vogel singt | el pájaro canta | l'uccello canta
happy birthday | joyeux anniversaire | alles gute zum geburtstag | feliz cumpleaños | buon compleanno
the door is open | la porte est ouverte | die tür ist offen | la puerta está abierta | la porta è aperta
i speak a little french | je parle un peu français | ich spreche ein bisschen französisch | hablo un poco de francés | parlo un po' di francese
the apple is green | la pomme est verte | der apfel ist grün | la manzana es verde | la mela è verde
my friend is coming tonight | mon ami vient ce soir | mein freund kommt heute abend | mi amigo viene esta noche | il mio amico viene stasera
the road is long | la route est longue | die straße ist lang | el camino es largo | la strada è lunga
i want to sleep | je veux dormir | ich will schlafen | quiero dormir | voglio dormire
the bus stops here | le bus s'arrête ici | der bus hält hier | el autobús para aquí | l'autobus si ferma qui
the soup is hot | la soupe est chaude | die suppe ist heiß | la sopa está caliente | la zuppa è calda
we live near the river | nous habitons près de la rivière | wir wohnen am fluss | vivimos cerca del río | abitiamo vicino al fiume
the film starts at eight | le film commence à huit heures | der film beginnt um acht | la película empieza a las ocho | il film inizia alle otto
"""

PHRASES: list[dict[str, str]] = [
    dict(zip(LANGS, (c.strip() for c in row.split("|")))) for row in _ROWS.strip().splitlines()
]
