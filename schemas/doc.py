"""Render the protocol table for README.md from `MESSAGES` (python -m schemas.doc)."""

from schemas.messages import MESSAGES, PROTOCOL_VERSION


def protocol_table() -> str:
    lines = [
        f"Protocol version {PROTOCOL_VERSION}. Every message: routing frames, one msgpack header "
        "`{v, t, ...fields}`, then payload frames.",
        "",
        "| type | from → to | fields | payload | purpose |",
        "|---|---|---|---|---|",
    ]
    for m in MESSAGES.values():
        fields = ", ".join(
            f"`{name}`{'' if f.required else '?'}: {f.describe()}" for name, f in m.fields.items()
        ) or "—"
        low, high = m.payload
        payload = "—" if high == 0 else (str(low) if low == high else f"{low}..{high}")
        purpose = m.purpose + (" *(planned)*" if m.planned else "")
        route = f"{', '.join(m.senders)} → {', '.join(m.receivers)}" + (f" (via {', '.join(m.via)})" if m.via else "")
        lines.append(f"| `{m.name}` | {route} | {fields} | {payload} | {purpose} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(protocol_table())
