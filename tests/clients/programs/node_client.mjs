// A Node.js HTTP client, driven one scenario at a time (see tests/clients/driver.py).
//
// `node node_client.mjs CLIENT` with CLIENT one of:
//   undici            undici's EnvHttpProxyAgent as the global dispatcher, fetch, WebSocket
//   undici-no-tunnel  the same with { proxyTunnel: false }
//   axios             axios with its defaults (it reads the proxy variables itself)
//   ws                ws, with https-proxy-agent as its agent (ws reads no proxy variables)
// Each stdin line is a scenario as JSON; each gets one JSON result line on stdout (and,
// while streaming, a {"event": "first"} line as soon as the first bytes arrived). CA
// trust comes from NODE_EXTRA_CA_CERTS, proxies from the environment.

import { createHash } from 'node:crypto'
import { readFile } from 'node:fs/promises'
import { createInterface } from 'node:readline'

const client = process.argv[2]

function emit (document) {
  process.stdout.write(JSON.stringify(document) + '\n')
}

class Stream {
  constructor () {
    this.size = 0
    this.digest = createHash('sha256')
  }

  add (data) {
    if (data.length && this.size === 0) emit({ event: 'first', bytes: data.length })
    this.size += data.length
    this.digest.update(data)
  }

  result (status) {
    return { status, size: this.size, sha256: this.digest.digest('hex') }
  }
}

// One WebSocket exchange: the server's greeting, then "hello" and its echo.
function exchange (socket, on) {
  return new Promise((resolve, reject) => {
    const messages = []
    on('message', (data) => {
      messages.push(String(data))
      if (messages.length === 1) socket.send('hello')
      if (messages.length === 2) {
        socket.close()
        resolve({ greeting: messages[0], echo: messages[1] })
      }
    })
    on('error', (error) => reject(error.error ?? error))
    on('close', () => reject(new Error(`closed after ${messages.length} messages`)))
  })
}

async function makeUndici (options) {
  const undici = await import('undici')
  return async (scenario) => {
    // A fresh agent per scenario: no connection carries over from the one before.
    const agent = new undici.EnvHttpProxyAgent(options)
    undici.setGlobalDispatcher(agent)
    try {
      return await runUndici(undici, agent, scenario)
    } finally {
      await agent.destroy()
    }
  }
}

async function runUndici (undici, agent, scenario) {
  const { url } = scenario
  switch (scenario.scenario) {
    case 'upload': {
      const body = await readFile(scenario.file)
      const response = await undici.fetch(url, { method: 'POST', body })
      return { status: response.status, body: await response.text() }
    }
    case 'stream': {
      const response = await undici.fetch(url)
      const stream = new Stream()
      for await (const data of response.body) stream.add(data)
      return stream.result(response.status)
    }
    case 'websocket':
    case 'websocket_tls': {
      const socket = new undici.WebSocket(url, { dispatcher: agent })
      return exchange(socket, (event, listener) =>
        socket.addEventListener(event, event === 'message' ? (e) => listener(e.data) : listener))
    }
    default: {
      const response = await undici.fetch(url)
      return { status: response.status, body: await response.text() }
    }
  }
}

async function makeAxios () {
  const axios = (await import('axios')).default
  const options = { validateStatus: () => true, timeout: 30000, responseType: 'text' }
  return async (scenario) => {
    const { url } = scenario
    switch (scenario.scenario) {
      case 'upload': {
        const body = await readFile(scenario.file)
        const response = await axios.post(url, body, {
          ...options,
          headers: { 'Content-Type': 'application/octet-stream' },
          maxBodyLength: Infinity
        })
        return { status: response.status, body: response.data }
      }
      case 'stream': {
        const response = await axios.get(url, { ...options, responseType: 'stream' })
        const stream = new Stream()
        for await (const data of response.data) stream.add(data)
        return stream.result(response.status)
      }
      default: {
        const response = await axios.get(url, options)
        return { status: response.status, body: response.data }
      }
    }
  }
}

async function makeWs () {
  const { default: WebSocket } = await import('ws')
  const { HttpsProxyAgent } = await import('https-proxy-agent')
  return async (scenario) => {
    const secure = scenario.url.startsWith('wss:')
    const proxy = secure
      ? process.env.https_proxy ?? process.env.HTTPS_PROXY
      : process.env.http_proxy ?? process.env.HTTP_PROXY
    const socket = new WebSocket(scenario.url, { agent: new HttpsProxyAgent(proxy) })
    return exchange(socket, (event, listener) => socket.on(event, listener))
  }
}

const makers = {
  undici: () => makeUndici({}),
  'undici-no-tunnel': () => makeUndici({ proxyTunnel: false }),
  axios: makeAxios,
  ws: makeWs
}

const run = await makers[client]()
for await (const line of createInterface({ input: process.stdin })) {
  const scenario = JSON.parse(line)
  let result
  try {
    result = await run(scenario)
  } catch (error) {
    const cause = error.cause ? ` (cause: ${error.cause.code ?? ''} ${error.cause.message})` : ''
    result = { error: `${error.name}: ${error.message}${cause}` }
  }
  emit({ result: true, ...result })
}
process.exit(0)
