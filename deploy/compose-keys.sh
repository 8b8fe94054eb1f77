#!/bin/sh
# The docker-compose.yml key setup (its one-shot `keygen` service), then each service's share.
#
# Everything is created once in $KEYS (the `keys` volume, which only this script mounts):
# a signing seed per identity, the roster of their public keys and the cluster secret
# (deploy/keygen.py, which keeps what exists); the NATS identities file (`worknode keys add`:
# each service's NATS user is its signing key, with its role's permissions; the demo writer
# also has a caller identity for its RPC calls); the RPC root key with its public keyring; a
# local CA constrained to the NATS servers' host names with one certificate per server
# (server and client usage: it serves clients and both ends of the routes); Grafana's admin
# password. A re-run keeps all of these. What derives from them is made on every run: the
# writer's RPC token (a restarted stack never holds an expired one) and each NATS server's
# config (deploy/nats.conf.template + `worknode keys nats-config`).
#
# Then each service gets only what it reads, in its own volume mounted at $OUT/<service>:
# a worknode its seed, the roster, the cluster secret, the RPC keyring and the CA
# certificate; the healer its seed, the roster, the cluster secret and the CA certificate;
# the writer its two seeds, the roster, its token and the CA certificate; a NATS server its
# certificate and key, the CA certificate and its config; Grafana its admin password.
# No service but this one sees another's seed, a server's TLS key, the CA key or the RPC root
# key. The cluster secret is shared by design (every replica and the healer key their Merkle
# trees with it), and so is the CA certificate (public).
#
# Usage: compose-keys.sh NODE [NODE ...]   (the worknode services; "healer", "writer", the
# NATS servers and "grafana" are always set up). Environment: KEYS, OUT, OWNER (the uid the
# worknode services run as), NATS_OWNER and GRAFANA_OWNER (the uids of those images),
# NATS_SERVERS (their host names), NATS_DIR (where a NATS server mounts its share), KEYGEN
# (path of keygen.py), NATS_TEMPLATE, NAMESPACE, SUBJECT, TOKEN_TTL (seconds).
set -eu

KEYS=${KEYS:-/var/lib/worknode/keys}
OUT=${OUT:-/keys}
OWNER=${OWNER:-10001}
NATS_OWNER=${NATS_OWNER:-0}         # the nats image runs as root
GRAFANA_OWNER=${GRAFANA_OWNER:-472}  # the grafana image's user
NATS_SERVERS=${NATS_SERVERS:-nats-1 nats-2 nats-3}
NATS_DIR=${NATS_DIR:-/etc/nats}
KEYGEN=${KEYGEN:-/usr/local/lib/worknode/keygen.py}
NATS_TEMPLATE=${NATS_TEMPLATE:-$(dirname "$KEYGEN")/nats.conf.template}
NAMESPACE=${NAMESPACE:-demo}
SUBJECT=${SUBJECT:-orders}
REVOCATIONS=revocations  # the nodes' RPC revocation set, a replicated subject they host
TOKEN_TTL=${TOKEN_TTL:-2592000}

[ "$#" -gt 0 ] || { echo "usage: $0 NODE [NODE ...]" >&2; exit 2; }
umask 077

python "$KEYGEN" "$KEYS" "$@" healer:healer writer:writer

# NATS identities: the same seeds (a signing process's NATS user is its signing key).
ids="$KEYS/identities.json"
add() {  # add NAME ROLE SEED SUBJECT...
    name=$1 role=$2 seed=$3
    shift 3
    subjects=""
    for s in "$@"; do subjects="$subjects --subject $s"; done
    # shellcheck disable=SC2086  # subjects: one word per option
    worknode keys add "$name" --role "$role" --namespace "$NAMESPACE" $subjects \
        --seed "$KEYS/$seed" --identities "$ids" > /dev/null
}
for node in "$@"; do
    add "$node" node "$node.key" "$SUBJECT" "$REVOCATIONS"
done
add healer healer healer.key "$SUBJECT" "$REVOCATIONS"
add writer writer writer.key "$SUBJECT"
# The demo writer's RPC calls: a caller (a writer may not publish RPC requests).
add writer-rpc caller writer-rpc.key "$SUBJECT"

if [ ! -f "$KEYS/rpc-root.key" ]; then
    worknode token keygen --key-id 1 --out "$KEYS/rpc-root.key" --keyring "$KEYS/rpc-keyring.json"
fi
# Written beside, then renamed: a writer reading the token never sees half of it. The token
# is held by the writer's RPC identity: only calls signed with writer-rpc.key may use it.
worknode token mint --root-key "$KEYS/rpc-root.key" --namespace "$NAMESPACE" \
    --subject "$SUBJECT" --method get --ttl "$TOKEN_TTL" --holder "@$KEYS/writer-rpc.key" \
    > "$KEYS/writer.token.new"
mv "$KEYS/writer.token.new" "$KEYS/writer.token"

# TLS: a CA that can sign for the NATS servers' names only, a certificate per server.
hosts=""
for n in $NATS_SERVERS; do hosts="$hosts --host $n"; done
# shellcheck disable=SC2086
worknode tls init "$KEYS/tls" $hosts > /dev/null
for n in $NATS_SERVERS; do
    worknode tls issue "$KEYS/tls" "$n" --host "$n" > /dev/null
done

# Each server's config, rendered anew: the template and the identities may have changed.
accounts=$(worknode keys nats-config --identities "$ids")
for n in $NATS_SERVERS; do
    routes=""
    for m in $NATS_SERVERS; do
        [ "$m" = "$n" ] || routes="$routes${routes:+, }\"nats://$m:6222\""
    done
    sed -e "s|@NAME@|$n|g" -e "s|@DIR@|$NATS_DIR|g" -e "s|@ROUTES@|$routes|g" \
        "$NATS_TEMPLATE" > "$KEYS/$n.conf.new"
    printf '%s\n' "$accounts" >> "$KEYS/$n.conf.new"
    mv "$KEYS/$n.conf.new" "$KEYS/$n.conf"
done

# Grafana's admin password: random, once (Grafana sets it when it creates its database).
if [ ! -f "$KEYS/admin-password" ]; then
    python -c "import secrets; print(secrets.token_urlsafe(24), end='')" \
        > "$KEYS/admin-password.new"
    mv "$KEYS/admin-password.new" "$KEYS/admin-password"
fi

# give SERVICE FILE...: copy FILEs (paths in $KEYS) into $OUT/SERVICE under their base
# names, owned by $GIVE_OWNER (default $OWNER), mode 0600; the directory (the volume's root)
# is that user's too, mode 0700: only the service's user may even list it.
give() {
    dir="$OUT/$1"
    shift
    mkdir -p "$dir"
    chown "${GIVE_OWNER:-$OWNER}" "$dir"
    chmod 700 "$dir"
    for f in "$@"; do
        to="$dir/$(basename "$f")"
        cp "$KEYS/$f" "$to.new"
        chmod 600 "$to.new"
        chown "${GIVE_OWNER:-$OWNER}" "$to.new"
        mv "$to.new" "$to"
    done
}

for node in "$@"; do
    give "$node" "$node.key" roster.json cluster.secret rpc-keyring.json tls/ca.pem
done
give healer healer.key roster.json cluster.secret tls/ca.pem
give writer writer.key writer-rpc.key roster.json writer.token tls/ca.pem
for n in $NATS_SERVERS; do
    GIVE_OWNER=$NATS_OWNER give "$n" "tls/$n.pem" "tls/$n-key.pem" tls/ca.pem "$n.conf"
done
GIVE_OWNER=$GRAFANA_OWNER give grafana admin-password
echo "keys given to: $* healer writer $NATS_SERVERS grafana"
