"""Constants of the kernel shape and the host paths, each with the reason for its value."""

import socket
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
RT_TABLE_MAIN: Final = 254  # the kernel's main table

# setsockopt(SOL_SOCKET, SO_MARK): a probe's or a race's socket marked as its link's traffic
# (36 is Linux's number, for a Python built without the name).
SO_MARK: Final[int] = getattr(socket, "SO_MARK", 36)

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
# A hook (a .py hook's child process, a command line of pre-run/, routes/, post-run/) still running
# after this long is killed with its process group: a script calling ip or nft a few hundred times
# ends well inside it, and a hung one must not hold its result (or a rebuild's pre-run/) longer.
HOOK_TIMEOUT_S: Final = 10.0
HOOK_COMMAND_TIMEOUT_S: Final = HOOK_TIMEOUT_S
# A hook's output kept for the log: enough for an error message; the rest is read and dropped, so
# a runaway print costs no memory.
HOOK_OUTPUT_LIMIT: Final = 4096
# The most a .py hook's child may answer (its recorded B calls as JSON, ~100 bytes each): tens of
# thousands of calls; more is a runaway loop, refused rather than held in memory.
HOOK_RESULT_LIMIT: Final = 4 * 1024 * 1024
# Hook files are a few lines; one larger than this is a mistake and is refused, not read.
HOOK_FILE_LIMIT: Final = 1024 * 1024
# The daemon looks at the hook directories (names, sizes, times: stat only) this often, and runs
# the hooks again when something changed: an edit takes effect within this long.
HOOK_RESCAN_S: Final = 2.0

DEFAULT_CONFIG_PATH: Final = "/etc/uplinkd/uplinkd.toml"

# Link monitoring (monitor/link.py). Probe rounds kept for the loss percentage: 20 rounds give
# 5 % steps, so the 20 %/10 % thresholds (uplinkd's, and Net-ISP-Balance's lsm.conf) are exact,
# and span 4 s at 200 ms probing.
LOSS_WINDOW_ROUNDS: Final = 20
# Flap damping: a link that stays up this long is stable again and its flap count is forgotten.
FLAP_WINDOW_S: Final = 60.0
# Two up->down changes may be an outage and its repair; a third without a stable spell is flapping.
FLAP_DAMPING_FROM: Final = 3
# First hold-down: ten probe intervals, which already cuts a 300 ms flap to a few transitions.
FLAP_HOLD_MIN_S: Final = 2.0
# Holds double per further flap up to this, so even a chronic flapper is retried every 5 minutes.
FLAP_HOLD_MAX_S: Final = 300.0

# Transitions arriving within this time share one apply (several links dying at once, a probe
# round reporting on every link together); short enough not to matter for failover time.
COALESCE_S: Final = 0.005
# How often link timers (long_down, flap hold-down) are looked at; well under a probe interval.
TICK_S: Final = 0.1
# SIGTERM to exit, whatever mail, event hooks or the bus are doing: far inside systemd's stop
# timeout (90 s by default) and short enough that a restart is not noticed. The three below add
# up to less than this, and nothing else at stop waits on anything outside the daemon.
STOP_BOUND_S: Final = 5.0
# At stop, event hooks and mail still in flight get this long (together, not one after the
# other) to finish: a mail about the last state change usually goes in well under a second.
SHUTDOWN_DRAIN_S: Final = 3.0
# What is still running after that is cut (a hook's or sendmail's process group killed, an SMTP
# connection shut), then waited for this long: a killed process is reaped in milliseconds.
SHUTDOWN_CUT_S: Final = 0.5
# Releasing the bus name at stop is a courtesy (the name goes with the connection): never longer.
BUS_STOP_TIMEOUT_S: Final = 1.0
# An event hook (up.d/, down.d/, long_down.d/) that runs longer is killed; foolsm had none.
EVENT_HOOK_TIMEOUT_S: Final = 10.0
# Interface counters are read this often for the links' traffic rates.
RATE_SAMPLE_S: Final = 1.0

# D-Bus: the versioned name, so an incompatible API can live beside this one as Uplinkd2.
BUS_NAME: Final = "org.uplinkd.Uplinkd1"
BUS_PATH: Final = "/org/uplinkd/Uplinkd1"
# Connecting to the bus (with its authentication and Hello) and taking the name each take
# milliseconds, even on a busy bus at boot; a bus that has not answered in this long is broken,
# and the daemon runs without it (its links are monitored and failed over from the start).
BUS_START_TIMEOUT_S: Final = 10.0
# A failed apply (a device or address changing underneath) is tried again this often.
APPLY_RETRY_S: Final = 1.0

# Measured methods (measured.py). Overflow: a link it spilled from is taken back only this far
# (as a fraction of capacity) below the saturation threshold, so a link hovering at it is stable.
OVERFLOW_HYSTERESIS: Final = 0.10
# Least-used: move new connections only for at least this much more free capacity (5 Mbit/s).
LEAST_USED_MARGIN_BPS: Final = 5e6
# Lowest-latency: move only for a gain of at least this many ms and this share of the latency,
# so that two equal links (jitter of a few ms) do not trade places.
LATENCY_MARGIN_MS: Final = 5.0
LATENCY_MARGIN_RATIO: Final = 0.2
# Default saturation threshold of the overflow method, in percent of the configured bandwidth.
DEFAULT_SATURATION_PERCENT: Final = 90
# Fastest-response: how long a destination keeps the link that won its race (a rule may change
# it with cache_seconds), and the bounds of that key.
DEFAULT_FASTEST_CACHE_S: Final = 600
FASTEST_CACHE_RANGE_S: Final = (10, 86_400)
# A destination waiting for its race is not reported again for this long: it bounds how often
# the daemon races one destination when no link answers it.
FASTEST_PENDING_S: Final = 10
# A race that has no answer from any link after this long is given up (and retried only after
# FASTEST_PENDING_S).
FASTEST_RACE_TIMEOUT_S: Final = 3.0
# NFLOG group through which the kernel reports new destinations of fastest-response rules.
FASTEST_NFLOG_GROUP: Final = 21301
FASTEST_LOG_PREFIX: Final = "uplinkd-fr "

# One uplinkd per network namespace (instance.py): the modes that change the kernel hold a lock
# in this directory, which the systemd unit provides as RuntimeDirectory= (a tmpfs: no stale
# file survives a reboot). Tests point it elsewhere through the environment variable.
RUN_DIR: Final = "/run/uplinkd"
RUN_DIR_ENV: Final = "UPLINKD_RUN_DIR"
# The lock's name carries the network namespace's inode (as `lsns -t net` lists it), because
# uplinkd instances in different namespaces (lab routers, containers sharing /run) are
# independent; two in one namespace would overwrite each other's plan.
LOCK_NAME: Final = "uplinkd-net{netns}.lock"
# CAP_NET_ADMIN's bit in /proc/self/status's CapEff (linux/capability.h): routes, rules and
# nftables need it, whatever the uid.
CAP_NET_ADMIN_BIT: Final = 12
