"""The one list of board profile names the code refers to (the profiles themselves are the TOML
files of ``device_profiles``). Plain data: the command-line parsers read it without importing
pydantic."""

# The short names ``cahfp testbed --profiles`` accepts for the shipped profiles.
ALIASES = {
    "pi4": "raspberry-pi-4",
    "pi5": "raspberry-pi-5",
    "nano": "jetson-nano",
    "orin": "jetson-orin-nano",
    "nano-cpu": "jetson-nano-cpu",
    "orin-cpu": "jetson-orin-nano-cpu",
    "server": "x86-server",
}
# The boards a federation's clients emulate unless it names its own (``clients.profiles``), and
# the demo's four.
DEFAULT_BOARDS = ("raspberry-pi-4", "raspberry-pi-5", "jetson-nano", "jetson-orin-nano")
