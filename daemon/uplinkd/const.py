"""Constants of the kernel shape and the host paths, each with the reason for its value."""

from typing import Final

NFT_FAMILY: Final = "inet"
# One table owned by uplinkd; every other table (firewalld, docker, the admin's) is left alone.
NFT_TABLE: Final = "uplinkd"

# The mark bits uplinkd owns. Bits 8-15 leave the low byte free for other tools (tc, VPNs).
DEFAULT_MARK_MASK: Final = 0x0000FF00
# Link ids run from 1; the all-ones id in the mask stays free as a marker for other tools.
MAX_LINKS: Final = 254

# Routing table ids: base + 0 holds the default route for locally originated lookups,
# base + link id is the link's own table. 200..454 is clear of local/main/default (255, 254, 253).
DEFAULT_TABLE_BASE: Final = 200

# ip rule priorities: above the kernel's main (32766) and default (32767) rules, below the
# local rule (0), and away from 1000-3000 where mwan3 and many scripts put theirs.
DEFAULT_RULE_PRIORITY: Final = 10000
RULE_OFFSET_MAIN_SUPPRESS: Final = 0  # main table minus its default route: LAN and connected nets
RULE_OFFSET_FWMARK: Final = 100  # + link id: marked connections follow their link
RULE_OFFSET_FROM: Final = 300  # + link id: packets from a link's address leave by that link
RULE_OFFSET_OIF: Final = 600  # + link id: sockets bound to the device use the link's table
RULE_OFFSET_DEFAULT: Final = 900  # the default route for the router's own first lookup

# Routes and rules carry this protocol number so uplinkd can tell its own from foreign ones.
# It is unassigned in linux/rtnetlink.h and iproute2's rt_protos (which stop at 192, eigrp).
RTPROT_UPLINKD: Final = 213

# Buckets for persistence hashing: at least this many, so 20 sources spread over links.
MIN_HASH_BUCKETS: Final = 64
# Largest bucket count uplinkd will pick to keep weight ratios exact on any subset of links.
MAX_EXACT_BUCKETS: Final = 4096

# Hook directories beside the configuration, in the order Net-ISP-Balance ran them.
HOOK_DIRS: Final = ("pre-run", "routes", "firewall", "post-run")
HOOK_COMMAND_TIMEOUT_S: Final = 10.0

DEFAULT_CONFIG_PATH: Final = "/etc/uplinkd/uplinkd.toml"
