"""Word lists for the synthetic shop: themes shared by all domains, and one vocabulary per known domain.

A *theme* (camping, baking, ...) is a taste that shows in every domain's titles through shared theme
words and brands, which is what lets a model carry a user's taste from one domain to another. A
synthetic domain's name picks its vocabulary here; add a `DomainVocabulary` to support a new name.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Theme:
    # Adjectives that put the theme into a title ("Backpacking", "Barista").
    words: tuple[str, ...]
    # Brands that sell this theme in every domain (a coffee brand sells grinders and beans); users
    # stay with their brand of a theme across domains, so a brand is the finest cross-domain signal.
    brands: tuple[str, ...]


@dataclass(frozen=True)
class DomainVocabulary:
    # Brands without a theme, and attributes that fit any product of the domain.
    brands: tuple[str, ...]
    attributes: tuple[str, ...]
    sizes: tuple[str, ...]
    price_range: tuple[float, float]
    # theme -> (product noun, category); a theme a domain does not sell is simply absent.
    products: dict[str, tuple[tuple[str, str], ...]]


THEMES: dict[str, Theme] = {
    "camping": Theme(("Camping", "Backpacking", "Outdoor", "Trail", "Lightweight"),
                     ("TrailPeak", "Summit Ridge", "Backcountry Co.", "Pinecrest")),
    "baking": Theme(("Baker's", "Homemade", "Bakery-Style", "Pastry"),
                    ("Golden Crumb", "Hearth & Oven", "Sugarloaf", "Flourish Mill")),
    "coffee": Theme(("Barista", "Dark Roast", "Espresso", "Artisan"),
                    ("Roastworks", "Daily Grind", "Crema House", "Bean Theory")),
    "tea": Theme(("Loose Leaf", "Japanese", "Herbal", "Ceremonial"),
                 ("Leaf & Kettle", "Jade Garden", "Steep Society", "Willow Leaf")),
    "grilling": Theme(("BBQ", "Smokehouse", "Grill Master", "Texas-Style"),
                      ("Smokehouse Pit", "Ember King", "Char & Co.", "Pitmaster Pro")),
    "asian": Theme(("Asian", "Japanese-Style", "Szechuan", "Thai"),
                   ("Lotus Kitchen", "Red Lantern", "Golden Dragon", "Umami House")),
    "italian": Theme(("Italian", "Tuscan", "Neapolitan", "Trattoria"),
                     ("Nonna's Table", "Tuscany Fields", "Bella Cucina", "Amalfi Coast")),
    "healthy": Theme(("Organic", "Plant-Based", "Keto", "Vegan"),
                     ("GreenSprout", "Pure Harvest", "Vital Roots", "Bloom Bowl")),
}

KITCHEN = DomainVocabulary(
    brands=("Acme", "HomeCraft", "Kitchenry", "ChefMate", "Culina", "IronLeaf"),
    attributes=("Stainless Steel", "Nonstick", "BPA-Free", "Dishwasher-Safe", "Heavy-Duty", "Premium",
                "Compact"),
    sizes=("8 inch", "10 inch", "12 inch", "1.5 Quart", "2 Liter", "Set of 2", "Set of 4", "Large",
           "Black", "Red", "Silver"),
    price_range=(6.0, 120.0),
    products={
        "camping": (("Camping Cookware Set", "Cookware"), ("Collapsible Silicone Kettle", "Cookware"),
                    ("Titanium Spork", "Kitchen Utensils"), ("Enamel Camp Mug", "Drinkware"),
                    ("Cast Iron Camp Skillet", "Cookware"), ("Insulated Water Bottle", "Drinkware"),
                    ("Folding Cutting Board", "Kitchen Utensils")),
        "baking": (("Nonstick Loaf Pan", "Bakeware"), ("Silicone Baking Mat", "Bakeware"),
                   ("Rolling Pin", "Kitchen Utensils"), ("Cooling Rack", "Bakeware"),
                   ("Measuring Cups Set", "Kitchen Utensils"), ("Springform Cake Pan", "Bakeware"),
                   ("Stand Mixer", "Small Appliances"), ("Cookie Sheet", "Bakeware")),
        "coffee": (("Pour-Over Coffee Dripper", "Coffee & Tea"), ("French Press", "Coffee & Tea"),
                   ("Burr Coffee Grinder", "Small Appliances"), ("Gooseneck Kettle", "Coffee & Tea"),
                   ("Cold Brew Maker", "Coffee & Tea"), ("Milk Frother", "Small Appliances"),
                   ("Coffee Canister", "Storage")),
        "tea": (("Glass Teapot with Infuser", "Coffee & Tea"), ("Cast Iron Tetsubin Teapot", "Coffee & Tea"),
                ("Tea Infuser Ball", "Coffee & Tea"), ("Matcha Whisk Set", "Coffee & Tea"),
                ("Porcelain Tea Cup Set", "Drinkware"), ("Electric Tea Kettle", "Small Appliances"),
                ("Tea Storage Tin", "Storage")),
        "grilling": (("Grill Tongs", "Kitchen Utensils"), ("Meat Thermometer", "Kitchen Utensils"),
                     ("Basting Brush", "Kitchen Utensils"), ("Grill Basket", "Cookware"),
                     ("Cedar Grilling Planks", "Cookware"), ("Smoker Box", "Cookware"),
                     ("Rib Rack", "Cookware")),
        "asian": (("Carbon Steel Wok", "Cookware"), ("Bamboo Steamer Basket", "Cookware"),
                  ("Rice Cooker", "Small Appliances"), ("Chopsticks Set", "Kitchen Utensils"),
                  ("Sushi Making Kit", "Kitchen Utensils"), ("Santoku Knife", "Cutlery"),
                  ("Ramen Bowl Set", "Dinnerware")),
        "italian": (("Pasta Maker Machine", "Small Appliances"), ("Ravioli Cutter", "Kitchen Utensils"),
                    ("Pizza Stone", "Bakeware"), ("Pizza Peel", "Kitchen Utensils"),
                    ("Cheese Grater", "Kitchen Utensils"), ("Olive Oil Dispenser", "Storage"),
                    ("Chef Knife", "Cutlery")),
        "healthy": (("Spiralizer Vegetable Slicer", "Kitchen Utensils"), ("Salad Spinner", "Kitchen Utensils"),
                    ("Glass Meal Prep Containers", "Storage"), ("Smoothie Blender", "Small Appliances"),
                    ("Vegetable Steamer", "Cookware"), ("Digital Food Scale", "Kitchen Utensils"),
                    ("Herb Keeper", "Storage")),
    },
)

FOOD = DomainVocabulary(
    brands=("Happy Belly", "Nature's Pantry", "Farmhouse", "Market Basket", "Acme Foods", "Sunny Valley"),
    attributes=("Gluten-Free", "Non-GMO", "Family Size", "Premium", "All Natural", "Kosher", "Low Sodium"),
    sizes=("12 oz", "16 oz", "2 lb", "Pack of 6", "Pack of 12", "24 Count", "8.5 fl oz", "1 lb Bag"),
    price_range=(2.5, 40.0),
    products={
        "camping": (("Trail Mix", "Snacks"), ("Beef Jerky", "Snacks"),
                    ("Freeze-Dried Chili Mac", "Prepared Meals"), ("Freeze-Dried Beef Stroganoff", "Prepared Meals"),
                    ("Energy Bars", "Snacks"), ("Instant Oatmeal Packets", "Breakfast"),
                    ("Electrolyte Drink Mix", "Beverages"), ("Campfire S'mores Kit", "Snacks")),
        "baking": (("All-Purpose Flour", "Baking Supplies"), ("Pure Vanilla Extract", "Baking Supplies"),
                   ("Dark Chocolate Chips", "Baking Supplies"), ("Active Dry Yeast", "Baking Supplies"),
                   ("Almond Flour", "Baking Supplies"), ("Rainbow Sprinkles", "Baking Supplies"),
                   ("Cake Mix", "Baking Supplies")),
        "coffee": (("Whole Bean Coffee", "Coffee"), ("Ground Coffee", "Coffee"), ("Espresso Beans", "Coffee"),
                   ("Cold Brew Coffee Concentrate", "Coffee"), ("Coffee Creamer", "Beverages"),
                   ("Ethiopian Single-Origin Coffee", "Coffee"), ("Hazelnut Coffee Syrup", "Beverages")),
        "tea": (("Green Tea Bags", "Tea"), ("Matcha Powder", "Tea"), ("Earl Grey Tea", "Tea"),
                ("Chamomile Tea", "Tea"), ("Oolong Tea", "Tea"), ("Chai Tea Latte Mix", "Tea"),
                ("Raw Honey", "Pantry Staples")),
        "grilling": (("BBQ Dry Rub", "Sauces & Spices"), ("Hickory BBQ Sauce", "Sauces & Spices"),
                     ("Steak Seasoning", "Sauces & Spices"), ("Smoked Sea Salt", "Sauces & Spices"),
                     ("Hot Sauce", "Sauces & Spices"), ("Brisket Rub", "Sauces & Spices"),
                     ("Chicken Marinade", "Sauces & Spices")),
        "asian": (("Soy Sauce", "Sauces & Spices"), ("Jasmine Rice", "Pasta & Grains"),
                  ("Ramen Noodles", "Pasta & Grains"), ("Sriracha Chili Sauce", "Sauces & Spices"),
                  ("Toasted Sesame Oil", "Pantry Staples"), ("Nori Seaweed Sheets", "Snacks"),
                  ("Miso Paste", "Pantry Staples")),
        "italian": (("Spaghetti Pasta", "Pasta & Grains"), ("Extra Virgin Olive Oil", "Pantry Staples"),
                    ("San Marzano Tomatoes", "Pantry Staples"), ("Marinara Sauce", "Sauces & Spices"),
                    ("Arborio Risotto Rice", "Pasta & Grains"), ("Balsamic Vinegar", "Pantry Staples"),
                    ("Basil Pesto", "Sauces & Spices")),
        "healthy": (("Quinoa", "Pasta & Grains"), ("Chia Seeds", "Pantry Staples"),
                    ("Protein Powder", "Beverages"), ("Almond Butter", "Pantry Staples"),
                    ("Rolled Oats", "Breakfast"), ("Goji Berries", "Snacks"), ("Kale Chips", "Snacks")),
    },
)

# A third domain so multi-source setups can be tried on synthetic data; it sells only the themes
# that have outdoor gear, which also exercises themes missing from a domain.
OUTDOORS = DomainVocabulary(
    brands=("Northbound", "Wildway", "Acme Outdoors", "Ridgeline"),
    attributes=("Waterproof", "Ultralight", "Packable", "Durable", "All-Season", "Reflective"),
    sizes=("1-Person", "2-Person", "Medium", "Large", "20 L", "35 L", "Green", "Orange"),
    price_range=(8.0, 250.0),
    products={
        "camping": (("Dome Tent", "Tents"), ("Sleeping Bag", "Sleeping Gear"), ("Headlamp", "Lighting"),
                    ("Trekking Poles", "Hiking"), ("Hiking Backpack", "Backpacks"),
                    ("Camping Hammock", "Sleeping Gear"), ("Backpacking Stove", "Camp Kitchen")),
        "grilling": (("Portable Charcoal Grill", "Camp Kitchen"), ("Charcoal Chimney Starter", "Camp Kitchen"),
                     ("Campfire Grill Grate", "Camp Kitchen"), ("Grill Cover", "Accessories")),
        "coffee": (("Camp Coffee Percolator", "Camp Kitchen"), ("Insulated Travel Mug", "Hydration")),
        "tea": (("Vacuum Insulated Thermos", "Hydration"),),
        "healthy": (("Yoga Mat", "Fitness"), ("Resistance Bands", "Fitness"), ("Running Vest", "Fitness"),
                    ("Hydration Bladder", "Hydration"), ("Foam Roller", "Fitness")),
    },
)

DOMAIN_VOCABULARIES: dict[str, DomainVocabulary] = {"Kitchen": KITCHEN, "Food": FOOD, "Outdoors": OUTDOORS}
