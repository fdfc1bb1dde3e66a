// MQTT.js (npm `mqtt` 5) publishing N messages at QoS 1 over MQTT 5, each
// with a content type and a user property; exits 0 once every one is
// acknowledged. Usage: node mqttjs_pub.js HOST PORT TOPIC N
const mqtt = require('mqtt')
const [host, port, topic, n] = process.argv.slice(2)
const client = mqtt.connect({ host, port: Number(port), protocolVersion: 5, clientId: 'mqttjs-pub', reconnectPeriod: 0 })
client.on('error', (e) => { console.error(e.message); process.exit(1) })
client.on('connect', async () => {
  const properties = { contentType: 'text/plain', userProperties: { origin: 'mqtt.js' } }
  for (let i = 0; i < Number(n); i++) {
    await client.publishAsync(topic, `j-${String(i).padStart(6, '0')}`, { qos: 1, properties })
  }
  await client.endAsync()
})
