// MQTT.js (npm `mqtt` 5) subscribed at QoS 1 over MQTT 5: prints
// SUBSCRIBED, then one JSON line per message (payload, content type, user
// properties), and exits once N distinct payloads came.
// Usage: node mqttjs_sub.js HOST PORT TOPIC N
const mqtt = require('mqtt')
const [host, port, topic, n] = process.argv.slice(2)
const seen = new Set()
const client = mqtt.connect({ host, port: Number(port), protocolVersion: 5, clientId: 'mqttjs-sub', reconnectPeriod: 0 })
client.on('error', (e) => { console.error(e.message); process.exit(1) })
client.on('connect', async () => {
  await client.subscribeAsync(topic, { qos: 1 })
  console.log('SUBSCRIBED')
})
client.on('message', (t, payload, packet) => {
  const p = packet.properties || {}
  console.log(JSON.stringify({ payload: payload.toString(), contentType: p.contentType, user: p.userProperties }))
  seen.add(payload.toString())
  if (seen.size >= Number(n)) client.end(() => process.exit(0))
})
