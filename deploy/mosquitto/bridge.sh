#!/bin/sh
# Render deploy/mosquitto/bridge.conf for one vehicle to stdout.
#   bridge.sh --fleet mqtts://fleet.example:8883 --vehicle-id car-17 \
#       --ca /etc/mosquitto/certs/ca.crt --cert /etc/mosquitto/certs/car-17.crt --key /etc/mosquitto/certs/car-17.key
# mqtts:// logs in with the vehicle's own certificate (its CN is its account on the fleet broker);
# --password-file FILE logs in as the vehicle_id with the password in FILE instead (over TLS or not).
set -eu
HERE=$(cd "$(dirname "$0")" && pwd -P)

die() {
    echo "bridge.sh: $*" >&2
    exit 2
}

fleet= vehicle= ca= cert= key= password_file= max_queued=1000000
while [ $# -gt 0 ]; do
    [ $# -ge 2 ] && [ -n "$2" ] || die "$1 needs a value"
    case $1 in
        --fleet) fleet=$2 ;;
        --vehicle-id) vehicle=$2 ;;
        --ca) ca=$2 ;;
        --cert) cert=$2 ;;
        --key) key=$2 ;;
        --password-file) password_file=$2 ;;
        --max-queued) max_queued=$2 ;;
        *) die "unknown argument: $1" ;;
    esac
    shift 2
done
[ -n "$fleet" ] || die "--fleet URL is required"
printf '%s' "$vehicle" | grep -Eq '^[A-Za-z0-9_-]+$' || die "--vehicle-id must match [A-Za-z0-9_-]+, not '$vehicle'"
case $fleet in
    mqtts://*) tls=1; rest=${fleet#mqtts://}; default_port=8883 ;;
    mqtt://*) tls=; rest=${fleet#mqtt://}; default_port=1883 ;;
    *) die "--fleet must be mqtt://host[:port] or mqtts://host[:port], not '$fleet'" ;;
esac
rest=${rest%/}
case $rest in
    *:*) host=${rest%:*}; port=${rest##*:} ;;
    *) host=$rest; port=$default_port ;;
esac
[ -n "$host" ] || die "no host in --fleet $fleet"

sed -e "s|@FLEET_HOST@|$host|g" -e "s|@FLEET_PORT@|$port|g" -e "s|@VEHICLE_ID@|$vehicle|g" -e "s|@MAX_QUEUED@|$max_queued|g" \
    "$HERE/bridge.conf"
if [ -n "$tls" ]; then
    [ -n "$ca" ] || die "mqtts:// needs --ca FILE"
    echo "bridge_cafile $ca"
    echo "bridge_insecure false"
    if [ -z "$password_file" ]; then
        [ -n "$cert" ] && [ -n "$key" ] || die "mqtts:// needs --cert and --key (or --password-file)"
        echo "bridge_certfile $cert"
        echo "bridge_keyfile $key"
    fi
fi
if [ -n "$password_file" ]; then
    [ -r "$password_file" ] || die "cannot read --password-file $password_file"
    echo "remote_username $vehicle"
    echo "remote_password $(head -n 1 "$password_file")"
fi
