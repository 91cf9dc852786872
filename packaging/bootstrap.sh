#!/usr/bin/env bash
# Launch-time bootstrap of a Rollwave instance (EC2 user data, cloud-init runcmd, or by hand):
# fetches the rollwave-agent Debian package, checks its sha256, installs it, writes
# /etc/rollwave/agent.toml, enables and starts the agent, and returns once the agent is
# ready: joined, connected, and running the stack's approved releases.
#
#   bootstrap.sh --coordinator coordinator.internal:7443 --token rwt1.... \
#       --package s3://my-releases/agents/rollwave-agent_0.1.0-1_amd64.deb --sha256 9f2c... \
#       [--stack web] [--layer app] [--zone us-east-1a] [--tag role=api ...]
#
# Every option can also come from the environment (ROLLWAVE_COORDINATOR, ROLLWAVE_JOIN_TOKEN,
# ROLLWAVE_PACKAGE, ROLLWAVE_PACKAGE_SHA256, ROLLWAVE_STACK, ROLLWAVE_LAYER, ROLLWAVE_ZONE);
# flags win. Run `bootstrap.sh --help` for all of them.
#
# Safe to run again (cloud-init may re-run user data; an operator may re-run it by hand): the
# package is installed only if that version is not installed yet, and once the instance has
# joined, the (spent, single-use) token is never written or used again.
#
# Exit codes: 0 ready; 2 usage; 3 package could not be fetched; 4 sha256 mismatch;
# 5 package install failed; 6 the agent did not become ready, has not joined, is not
# connected, or cannot install the stack's approved releases (its status then reads
# "install failing since T: reason"; it keeps retrying, so the instance may still recover).
set -euo pipefail

readonly CONFIG=/etc/rollwave/agent.toml
readonly IDENTITY=/etc/rollwave/tls/identity.toml
readonly UNIT=rollwave-agent.service
readonly PACKAGE_NAME=rollwave-agent

log() { printf 'rollwave-bootstrap: %s\n' "$*" >&2; }
fail() {
    local code=$1
    shift
    log "error: $*"
    exit "$code"
}

usage() {
    cat <<'USAGE'
Usage: bootstrap.sh --coordinator HOST:PORT --token TOKEN --package LOCATION --sha256 HEX [options]

Required (flag, or environment variable):
  --coordinator HOST:PORT   the coordinator (ROLLWAVE_COORDINATOR)
  --token TOKEN             join token from `rollwave token create`; it carries the coordinator's
                            CA fingerprint, so no CA file is needed (ROLLWAVE_JOIN_TOKEN)
  --package LOCATION        the rollwave-agent .deb: a local path, an http(s):// URL or an
                            s3://BUCKET/KEY URL (ROLLWAVE_PACKAGE)
  --sha256 HEX              sha256 of that .deb; nothing is installed unless it matches
                            (ROLLWAVE_PACKAGE_SHA256)

Optional:
  --stack NAME              refuse a token for any other stack (ROLLWAVE_STACK)
  --layer NAME              default "app" (ROLLWAVE_LAYER)
  --zone ZONE               default: from the EC2 instance metadata service (ROLLWAVE_ZONE)
  --instance-id ID          default: from the EC2 instance metadata service
  --hostname NAME           default: the kernel's hostname
  --tag KEY=VALUE           repeatable
  --no-imds                 never ask the EC2 instance metadata service (off EC2)
  --s3-endpoint URL         S3-compatible store, for the package and for releases (path-style)
  --s3-region REGION        default: AWS_REGION, else the instance's region, else us-east-1
  --ready-timeout SECONDS   how long to wait for the agent to be ready (default 900)
  -h, --help                this text

s3:// packages are fetched with the AWS CLI when it is installed, else with curl's SigV4
signing and the credentials in AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN
or, on EC2, the instance role's (IMDSv2). Exit codes: 0 ready, 2 usage, 3 fetch failed,
4 sha256 mismatch, 5 install failed, 6 agent not ready (not joined, not connected, or its
install of the approved releases keeps failing).
USAGE
}

coordinator=${ROLLWAVE_COORDINATOR:-}
token=${ROLLWAVE_JOIN_TOKEN:-}
package=${ROLLWAVE_PACKAGE:-}
sha256=${ROLLWAVE_PACKAGE_SHA256:-}
stack=${ROLLWAVE_STACK:-}
layer=${ROLLWAVE_LAYER:-app}
zone=${ROLLWAVE_ZONE:-}
instance_id=""
host_name=""
imds=auto
s3_endpoint=""
s3_region=""
ready_timeout=900
tags=()

need_value() {
    [[ $# -ge 2 && -n $2 ]] || fail 2 "$1 needs a value (see --help)"
}

while [[ $# -gt 0 ]]; do
    case $1 in
    --coordinator) need_value "$@"; coordinator=$2; shift 2 ;;
    --token) need_value "$@"; token=$2; shift 2 ;;
    --package) need_value "$@"; package=$2; shift 2 ;;
    --sha256) need_value "$@"; sha256=$2; shift 2 ;;
    --stack) need_value "$@"; stack=$2; shift 2 ;;
    --layer) need_value "$@"; layer=$2; shift 2 ;;
    --zone) need_value "$@"; zone=$2; shift 2 ;;
    --instance-id) need_value "$@"; instance_id=$2; shift 2 ;;
    --hostname) need_value "$@"; host_name=$2; shift 2 ;;
    --tag) need_value "$@"; tags+=("$2"); shift 2 ;;
    --no-imds) imds=off; shift ;;
    --s3-endpoint) need_value "$@"; s3_endpoint=${2%/}; shift 2 ;;
    --s3-region) need_value "$@"; s3_region=$2; shift 2 ;;
    --ready-timeout) need_value "$@"; ready_timeout=$2; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) fail 2 "unknown argument '$1' (see --help)" ;;
    esac
done

# --- Check the input before touching anything -------------------------------------------
[[ -n $coordinator ]] || fail 2 "--coordinator HOST:PORT is required"
[[ $coordinator == *:* ]] || fail 2 "--coordinator '$coordinator': expected HOST:PORT"
[[ -n $package ]] || fail 2 "--package is required (a path, http(s):// or s3:// URL of the rollwave-agent .deb)"
[[ -n $sha256 ]] || fail 2 "--sha256 is required: the package is verified before it is installed"
sha256=${sha256,,}
[[ $sha256 =~ ^[0-9a-f]{64}$ ]] || fail 2 "--sha256 '$sha256': expected 64 hexadecimal digits"
[[ $ready_timeout =~ ^[0-9]+$ ]] || fail 2 "--ready-timeout '$ready_timeout': expected seconds"
for tag in "${tags[@]}"; do
    [[ $tag =~ ^[A-Za-z0-9_.-]+=[^\"\\]*$ ]] || fail 2 "--tag '$tag': expected KEY=VALUE (no quotes or backslashes)"
done
for value in "$coordinator" "$stack" "$layer" "$zone" "$instance_id" "$host_name" "$s3_endpoint" "$s3_region"; do
    [[ $value != *[\"\\]* && $value != *$'\n'* ]] || fail 2 "'$value': quotes, backslashes and newlines are not allowed"
done
[[ $(id -u) -eq 0 ]] || fail 2 "must run as root (it installs a package and a system service)"

joined=false
if [[ -s $IDENTITY ]]; then
    joined=true
    log "this instance has already joined ($IDENTITY exists): the join token is not used again"
else
    [[ -n $token ]] || fail 2 "--token is required until the instance has joined"
    [[ $token =~ ^rwt1\.[^.]+\.[^.]+\.[^.]+$ ]] ||
        fail 2 "--token: expected rwt1.<id>.<secret>.<CA fingerprint>, the whole line \`rollwave token create\` printed"
fi

# --- Fetch ------------------------------------------------------------------------------
work=$(mktemp -d /var/tmp/rollwave-bootstrap.XXXXXX)
trap 'rm -rf "$work"' EXIT
deb="$work/$PACKAGE_NAME.deb"

imds_get() { # PATH -> stdout; IMDSv2 (a PUT for a session token, then the GET)
    local imds_token
    imds_token=$(curl -fsS --max-time 2 -X PUT http://169.254.169.254/latest/api/token \
        -H 'X-aws-ec2-metadata-token-ttl-seconds: 300') || return 1
    curl -fsS --max-time 2 -H "X-aws-ec2-metadata-token: $imds_token" "http://169.254.169.254/latest/$1"
}

# Prints the value of KEY in a flat JSON object (the IMDS credentials document).
json_field() { sed -n "s/.*\"$1\"[[:space:]]*:[[:space:]]*\"\([^\"]*\)\".*/\1/p" | head -n 1; }

fetch_s3() { # s3://BUCKET/KEY -> $deb
    local url=$1 bucket key region access secret session role credentials
    bucket=${url#s3://}
    bucket=${bucket%%/*}
    key=${url#s3://"$bucket"/}
    [[ -n $bucket && -n $key && $key != "$url" ]] || fail 2 "--package '$url': expected s3://BUCKET/KEY"
    region=${s3_region:-${AWS_REGION:-${AWS_DEFAULT_REGION:-}}}
    if [[ -z $region && $imds == auto ]]; then
        region=$(imds_get meta-data/placement/region 2>/dev/null || true)
    fi
    region=${region:-us-east-1}
    if command -v aws >/dev/null; then
        local endpoint_args=()
        [[ -n $s3_endpoint ]] && endpoint_args=(--endpoint-url "$s3_endpoint")
        aws --region "$region" "${endpoint_args[@]}" s3 cp --only-show-errors "$url" "$deb"
        return
    fi
    command -v curl >/dev/null || fail 3 "fetching $url needs the AWS CLI or curl; install one, or pass an http(s) URL or a local path"
    access=${AWS_ACCESS_KEY_ID:-}
    secret=${AWS_SECRET_ACCESS_KEY:-}
    session=${AWS_SESSION_TOKEN:-}
    if [[ -z $access && $imds == auto ]]; then
        role=$(imds_get meta-data/iam/security-credentials/ 2>/dev/null | head -n 1 || true)
        [[ -n $role ]] || fail 3 "no AWS credentials for $url: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or give the instance a role"
        credentials=$(imds_get "meta-data/iam/security-credentials/$role") || fail 3 "cannot read the instance role's credentials"
        access=$(json_field AccessKeyId <<<"$credentials")
        secret=$(json_field SecretAccessKey <<<"$credentials")
        session=$(json_field Token <<<"$credentials")
    fi
    [[ -n $access && -n $secret ]] || fail 3 "no AWS credentials for $url: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or give the instance a role"
    local object_url
    if [[ -n $s3_endpoint ]]; then
        object_url="$s3_endpoint/$bucket/$key"
    else
        object_url="https://$bucket.s3.$region.amazonaws.com/$key"
    fi
    local headers=(-H "x-amz-content-sha256: UNSIGNED-PAYLOAD")
    [[ -n $session ]] && headers+=(-H "x-amz-security-token: $session")
    curl -fsS --retry 5 --retry-connrefused --retry-delay 2 --connect-timeout 10 \
        --aws-sigv4 "aws:amz:$region:s3" --user "$access:$secret" "${headers[@]}" \
        -o "$deb" "$object_url"
}

log "fetching $package"
case $package in
s3://*)
    fetch_s3 "$package" || fail 3 "cannot fetch $package (see the message above)"
    ;;
http://* | https://*)
    if command -v curl >/dev/null; then
        curl -fsSL --retry 5 --retry-connrefused --retry-delay 2 --connect-timeout 10 -o "$deb" "$package" ||
            fail 3 "cannot fetch $package"
    elif command -v wget >/dev/null; then
        wget -q --tries=5 -O "$deb" "$package" || fail 3 "cannot fetch $package"
    else
        fail 3 "fetching $package needs curl or wget"
    fi
    ;;
*://*)
    fail 2 "--package '$package': only local paths, http(s):// and s3:// URLs are supported"
    ;;
*)
    [[ -f $package ]] || fail 3 "--package '$package' does not exist"
    cp -- "$package" "$deb" || fail 3 "cannot copy $package"
    ;;
esac

# --- Verify -----------------------------------------------------------------------------
actual=$(sha256sum "$deb" | cut -d' ' -f1)
if [[ $actual != "$sha256" ]]; then
    fail 4 "sha256 mismatch for $package (expected $sha256, got $actual): the file is not the one you meant; nothing was installed"
fi
log "sha256 verified ($sha256)"

# --- Install ----------------------------------------------------------------------------
version=$(dpkg-deb --field "$deb" Version) || fail 5 "$package is not a Debian package"
name=$(dpkg-deb --field "$deb" Package)
[[ $name == "$PACKAGE_NAME" ]] || fail 5 "$package is the package '$name', not $PACKAGE_NAME"
installed=$(dpkg-query --show --showformat '${db:Status-Status} ${Version}' "$PACKAGE_NAME" 2>/dev/null || true)
if [[ $installed == "installed $version" ]]; then
    log "$PACKAGE_NAME $version is already installed"
else
    log "installing $PACKAGE_NAME $version"
    # confold: keep an agent.toml already written (by a previous run of this script).
    DEBIAN_FRONTEND=noninteractive dpkg --force-confold -i "$deb" >"$work/dpkg.log" 2>&1 || {
        cat "$work/dpkg.log" >&2
        fail 5 "dpkg could not install $package"
    }
fi

# --- Configure --------------------------------------------------------------------------
quote() { printf '"%s"' "$1"; }
{
    echo "# Written by the Rollwave bootstrap script; see /usr/share/doc/$PACKAGE_NAME and the README."
    echo "coordinator = $(quote "$coordinator")"
    if $joined; then
        echo "# Joined: the identity in /etc/rollwave/tls/ is used; the join token was spent."
    else
        echo "join_token = $(quote "$token")"
    fi
    [[ -n $stack ]] && echo "stack = $(quote "$stack")"
    echo "layer = $(quote "$layer")"
    [[ -n $zone ]] && echo "zone = $(quote "$zone")"
    [[ -n $instance_id ]] && echo "instance_id = $(quote "$instance_id")"
    [[ -n $host_name ]] && echo "hostname = $(quote "$host_name")"
    echo "imds = $(quote "$imds")"
    echo "[tags]"
    for tag in "${tags[@]}"; do
        echo "$(quote "${tag%%=*}") = $(quote "${tag#*=}")"
    done
    echo "[s3]"
    if [[ -n $s3_endpoint ]]; then
        echo "endpoint = $(quote "$s3_endpoint")"
        echo "force_path_style = true"
    fi
    [[ -n $s3_region ]] && echo "region = $(quote "$s3_region")"
    true
} >"$work/agent.toml"

install -d -m 0755 /etc/rollwave
# Compared without the token lines: once joined, the file without the spent token is the same
# configuration, and rewriting it would restart the agent for nothing.
without_token() { grep -v -e '^join_token = ' -e '^# Joined: ' "$1" || true; }
config_changed=true
if [[ -f $CONFIG ]] && [[ "$(without_token "$work/agent.toml")" == "$(without_token "$CONFIG")" ]]; then
    config_changed=false
else
    # Replaced in one rename: the agent never reads half a file. Mode 0600: it holds the token.
    install -m 0600 "$work/agent.toml" "$CONFIG.bootstrap-new"
    mv -f "$CONFIG.bootstrap-new" "$CONFIG"
    log "wrote $CONFIG"
fi

# --- Start and wait until ready ---------------------------------------------------------
[[ -d /run/systemd/system ]] ||
    fail 6 "systemd is not running here; start the agent yourself: rollwave-agent run --config $CONFIG"
systemctl enable "$UNIT" >/dev/null 2>&1 || fail 6 "systemctl enable $UNIT failed"
# Type=notify: start (and restart) return once the agent says READY=1: connected, and the
# desired state the coordinator sent (the approved releases) applied; or after the agent's
# ready_fallback (90 s) with a STATUS that says what is wrong.
action=start
if $config_changed && systemctl --quiet is-active "$UNIT"; then
    action=restart
fi
log "systemctl $action $UNIT (waits until the agent is ready, at most ${ready_timeout}s)"
started=$(date +%s)
if ! timeout "$ready_timeout" systemctl "$action" "$UNIT"; then
    journalctl -u "$UNIT" -n 30 --no-pager >&2 2>/dev/null || true
    fail 6 "$UNIT did not become ready; see \`journalctl -u $UNIT\`"
fi
systemctl --quiet is-active "$UNIT" || fail 6 "$UNIT is not active; see \`journalctl -u $UNIT\`"
status=$(systemctl show --property StatusText --value "$UNIT")
[[ -s $IDENTITY ]] || fail 6 "$UNIT runs but has not joined ($status); see \`journalctl -u $UNIT\`"
case $status in
connected*) ;;
"install failing since"*)
    fail 6 "$UNIT is connected but cannot install the approved releases ($status); it keeps retrying: see \`journalctl -u $UNIT\`" ;;
*) fail 6 "$UNIT is up but not connected to $coordinator ($status); it keeps trying: see \`journalctl -u $UNIT\`" ;;
esac
log "ready in $(( $(date +%s) - started ))s: $status"
