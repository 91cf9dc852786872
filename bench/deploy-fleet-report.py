"""Summary of a bench/deploy-fleet.sh run, from its work dir.

Sources, all on the same host and clock:
  deployment.json                      the waves (rollwave deployment show --output json)
  agents/NAME/agent.log                agent timestamps: desired state received, switch, activate done
  agents/NAME/state/state/journal/app.json
                                       history[].at_unix_ms: when the activation finished (journaled)
  server.log                           coordinator timestamps: progress received, deployment finished
  ansible/hosts/NAME/current           symlink mtimes: when Ansible switched each host
"""

import argparse
import datetime
import json
import os
import re
import statistics
import sys

ANSI = re.compile(r"\x1b\[[0-9;]*m")
LINE = re.compile(r"^(\S+)\s+(\w+)\s+(\S+): (.*)$")


def parse_time(text):
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def lines(path):
    with open(path, encoding="utf-8", errors="replace") as log:
        for raw in log:
            match = LINE.match(ANSI.sub("", raw.rstrip("\n")))
            if match:
                yield parse_time(match.group(1)), match.group(4)


def field(message, name):
    match = re.search(rf'\b{name}="?([^\s"]+)"?', message)
    return match.group(1) if match else None


def agent_timeline(path, deployment, version):
    """Received (prepare), prepared, received (activate), switch, activated, from one agent's log."""
    times = {}
    for at, message in lines(path):
        if message.startswith("desired state received") and field(message, "deployment") == deployment:
            if "prepared" not in times:
                times.setdefault("received_prepare", at)
            elif "activated" not in times:
                times.setdefault("received_activate", at)
        elif message.startswith("desired state step") and field(message, "version") == version:
            step, outcome = field(message, "step"), field(message, "outcome")
            if outcome != "done":
                continue
            if step == "prepare":
                times.setdefault("prepared", at)
            elif step == "activate":
                times.setdefault("activated", at)
        elif message.startswith("step ") and field(message, "version") == version:
            if field(message, "stage") == "switch":
                times.setdefault("switch", at)
    return times


def stats(values):
    values = [value for value in values if value is not None]
    if not values:
        return "n/a"
    return "{:8.3f} {:8.3f} {:8.3f}".format(min(values), statistics.median(values), max(values))


def ms(seconds):
    return None if seconds is None else seconds * 1000.0


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", required=True)
    parser.add_argument("--agents", type=int, required=True)
    parser.add_argument("--waves", type=int, required=True)
    parser.add_argument("--version", default="2.0")
    parser.add_argument("--rollwave-start", type=float, required=True)
    parser.add_argument("--rollwave-end", type=float, required=True)
    parser.add_argument("--ansible-start", type=float, required=True)
    parser.add_argument("--ansible-end", type=float, required=True)
    parser.add_argument("--release-bytes", type=int, default=0)
    args = parser.parse_args()
    work = args.work

    with open(os.path.join(work, "deployment.json")) as file:
        deployment = json.load(file)
    deployment_id = deployment["id"]
    waves = [[instance["instance_id"] for instance in wave["instances"]] for wave in deployment["waves"]]

    timeline = {}
    for wave in waves:
        for name in wave:
            times = agent_timeline(os.path.join(work, "agents", name, "agent.log"), deployment_id, args.version)
            with open(os.path.join(work, "agents", name, "state", "state", "journal", "app.json")) as file:
                history = json.load(file)["history"]
            activations = [entry["at_unix_ms"] / 1000.0 for entry in history if entry["version"] == args.version]
            times["journal"] = activations[-1] if activations else None
            timeline[name] = times

    coordinator_activated = {}
    finished = None
    for at, message in lines(os.path.join(work, "server.log")):
        if message.startswith("progress ") and field(message, "version") == args.version:
            if field(message, "step") == "activate" and field(message, "state") == "done":
                coordinator_activated.setdefault(field(message, "instance"), at)
        elif message.startswith("deployment finished") and field(message, "deployment") == deployment_id:
            finished = at

    missing = [
        name
        for name, times in timeline.items()
        if any(times.get(key) is None for key in ("received_activate", "switch", "activated", "journal"))
    ]
    if missing:
        sys.exit(f"deploy-fleet: incomplete timelines for {len(missing)} agents, e.g. {missing[:5]}")

    def wave_times(index, key):
        return [timeline[name][key] for name in waves[index]]

    rows = []
    for index in range(len(waves)):
        received = wave_times(index, "received_activate")
        activated = wave_times(index, "activated")
        journal = wave_times(index, "journal")
        coordinator = [coordinator_activated.get(name) for name in waves[index]]
        row = {
            "wave": index + 1,
            "size": len(waves[index]),
            # First activation (journal) of this wave to the first of the next; the last wave to the end.
            "span": (min(wave_times(index + 1, "journal")) if index + 1 < len(waves) else finished) - min(journal),
            "duration": max(activated) - min(received),
            "dispatch": max(received) - min(received),
            "agent": statistics.median(a - r for a, r in zip(activated, received)),
            "gap": None,
            "gap_coordinator": None,
        }
        if index + 1 < len(waves):
            next_received = min(wave_times(index + 1, "received_activate"))
            row["gap"] = next_received - max(activated)
            if all(at is not None for at in coordinator):
                row["gap_coordinator"] = next_received - max(coordinator)
        rows.append(row)

    first_wish = min(wave_times(0, "received_activate"))
    last_activated = max(times["activated"] for times in timeline.values())
    prepared = [times.get("prepared") for times in timeline.values()]
    rollwave_total = args.rollwave_end - args.rollwave_start
    ansible_total = args.ansible_end - args.ansible_start

    print(f"agents: {args.agents}, waves: {len(waves)} of {'/'.join(str(len(w)) for w in waves)}")
    print(f"release: {args.release_bytes} bytes zip, no hooks, no health checks; deployment {deployment_id}")
    print()
    print(f"Rollwave, `rollwave deploy --watch` from command to exit:    {rollwave_total:8.3f} s")
    print(f"  command -> first activation wish (create, all prepare):  {first_wish - args.rollwave_start:8.3f} s")
    received_prepare = [times.get("received_prepare") for times in timeline.values()]
    if all(at is not None for at in received_prepare + prepared):
        prepare_times = [p - r for p, r in zip(prepared, received_prepare)]
        print(f"    command -> first prepare wish received                  {min(received_prepare) - args.rollwave_start:8.3f} s")
        print(f"    first -> last agent receives its prepare wish           {max(received_prepare) - min(received_prepare):8.3f} s")
        print(
            f"    agent prepare (download, verify, unpack), median / max  "
            f"{statistics.median(prepare_times):8.3f} / {max(prepare_times):.3f} s"
        )
        print(f"    last agent prepared -> first activation wish received   {first_wish - max(prepared):8.3f} s")
    print(f"  first activation wish -> last instance activated:         {last_activated - first_wish:8.3f} s")
    if finished is not None:
        print(f"  last activated -> coordinator 'deployment finished':      {finished - last_activated:8.3f} s")
        print(f"  'deployment finished' -> CLI exit (polls every 500 ms):   {args.rollwave_end - finished:8.3f} s")
        print(f"  command -> 'deployment finished' (no polling):            {finished - args.rollwave_start:8.3f} s")
    print()
    print("Per wave, ms (min / median / max over the waves):")
    print(f"  span: first activation -> first activation of next wave  {stats(ms(r['span']) for r in rows)}")
    print(f"  wave: first wish received -> last instance activated     {stats(ms(r['duration']) for r in rows)}")
    print(f"  dispatch: first -> last agent receives its wish          {stats(ms(r['dispatch']) for r in rows)}")
    print(f"  agent: wish received -> activated (median in wave)       {stats(ms(r['agent']) for r in rows)}")
    print(f"  gap: last activated (agent) -> next wave's first wish    {stats(ms(r['gap']) for r in rows)}")
    print(f"  gap: last activated (coordinator) -> next first wish     {stats(ms(r['gap_coordinator']) for r in rows)}")
    print()
    print("  wave  size    span ms    wave ms  dispatch ms   agent ms     gap ms  coord gap ms")
    for row in rows:
        def cell(key, width):
            value = row[key]
            return f"{'-':>{width}}" if value is None else f"{value * 1000:{width}.1f}"

        print(
            f"  {row['wave']:4d}  {row['size']:4d} {cell('span', 10)} {cell('duration', 10)} "
            f"{cell('dispatch', 12)} {cell('agent', 10)} {cell('gap', 10)} {cell('gap_coordinator', 13)}"
        )
    print("  (span: journaled activation times; the last wave's span runs to 'deployment finished')")
    print()

    # Ansible: when each host's download was written (its batch's first task) and its `current` switched.
    batch = args.agents // args.waves
    downloaded, switched = [], []
    for index in range(args.agents):
        host = os.path.join(work, "ansible", "hosts", f"h{index + 1:03d}")
        downloaded.append(os.stat(os.path.join(host, "downloads", f"app-{args.version}.zip")).st_mtime)
        switched.append(os.lstat(os.path.join(host, "current")).st_mtime)
    starts = [min(downloaded[start : start + batch]) for start in range(0, args.agents, batch)]
    ends = [max(switched[start : start + batch]) for start in range(0, args.agents, batch)]
    batch_spans = [(starts[i + 1] if i + 1 < len(starts) else args.ansible_end) - starts[i] for i in range(len(starts))]
    batch_durations = [end - start for start, end in zip(starts, ends)]
    batch_gaps = [starts[i + 1] - ends[i] for i in range(len(starts) - 1)]
    print(f"Ansible, `ansible-playbook` (serial {batch}, forks {batch}) from command to exit: {ansible_total:8.3f} s")
    print("  per batch, ms (min / median / max; from file mtimes):")
    print(f"  span: first download -> first download of next batch      {stats(ms(s) for s in batch_spans)}")
    print(f"  batch: first download -> last switch                       {stats(ms(s) for s in batch_durations)}")
    print(f"  gap: last switch -> next batch's first download            {stats(ms(s) for s in batch_gaps)}")
    print()
    print(f"ratio Ansible / Rollwave (command to exit):                  {ansible_total / rollwave_total:8.1f}x")
    if finished is not None:
        print(
            f"ratio Ansible / Rollwave (to 'deployment finished'):         "
            f"{ansible_total / (finished - args.rollwave_start):8.1f}x"
        )


if __name__ == "__main__":
    main()
