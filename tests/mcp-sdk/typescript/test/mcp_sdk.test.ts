// The official MCP TypeScript SDK, unmodified, against Tessera's token
// service. An MCP server built on the SDK (McpServer over the streamable
// HTTP transport) publishes Protected Resource Metadata naming Tessera's
// https issuer and accepts only tokens that jose verifies against the keys
// Tessera's RFC 8414 metadata points to. An MCP client built on the SDK, with
// the machine-to-machine provider it ships (StaticPrivateKeyJwtProvider) and
// a JWT-SVID fetched from the Workload API as its client assertion, discovers
// Tessera from the PRM, validates its metadata with the SDK's schema, and
// gets a token with client_credentials.
//
// Run by ../agent.sh (see run.sh), which exports TESSERA_ISSUER,
// TESSERA_CLIENT_ID, TESSERA_BIN, MCP_PORT_TS and SPIFFE_ENDPOINT_SOCKET.

import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { after, before, test } from 'node:test';

import { StaticPrivateKeyJwtProvider } from '@modelcontextprotocol/sdk/client/auth-extensions.js';
import { Client } from '@modelcontextprotocol/sdk/client/index.js';
import { StreamableHTTPClientTransport } from '@modelcontextprotocol/sdk/client/streamableHttp.js';
import { McpServer } from '@modelcontextprotocol/sdk/server/mcp.js';
import { StreamableHTTPServerTransport } from '@modelcontextprotocol/sdk/server/streamableHttp.js';
import type { AuthInfo } from '@modelcontextprotocol/sdk/server/auth/types.js';
import { createRemoteJWKSet, jwtVerify, type JWTPayload } from 'jose';

function env(name: string): string {
  const value = process.env[name];
  assert.ok(value, `${name} is set by tests/mcp-sdk/agent.sh`);
  return value;
}

const ISSUER = env('TESSERA_ISSUER');
const CLIENT_ID = env('TESSERA_CLIENT_ID');
const PORT = Number(env('MCP_PORT_TS'));
const ORIGIN = `http://127.0.0.1:${PORT}`;
const RESOURCE = `${ORIGIN}/mcp`;
const PRM_URL = `${ORIGIN}/.well-known/oauth-protected-resource/mcp`;

/** A JWT-SVID for `audience` from the Workload API (the tessera CLI). */
function jwtSvid(audience: string): string {
  const out = execFileSync(env('TESSERA_BIN'), ['api', 'fetch', 'jwt', '--audience', audience], {
    encoding: 'utf8',
  });
  const token = out.split('\n')[1]?.trim();
  assert.ok(token && token.split('.').length === 3, `a JWT-SVID in: ${out}`);
  return token;
}

let server: Server;
const accepted: JWTPayload[] = [];

before(async () => {
  const meta = (await (await fetch(`${ISSUER}/.well-known/oauth-authorization-server`)).json()) as {
    issuer: string;
    jwks_uri: string;
  };
  assert.equal(meta.issuer, ISSUER);
  const keys = createRemoteJWKSet(new URL(meta.jwks_uri));

  async function authenticate(req: IncomingMessage): Promise<AuthInfo | undefined> {
    const header = req.headers.authorization;
    if (!header?.startsWith('Bearer ')) return undefined;
    const token = header.slice('Bearer '.length);
    try {
      const { payload } = await jwtVerify(token, keys, {
        issuer: ISSUER,
        audience: RESOURCE,
        algorithms: ['ES256'],
        typ: 'at+jwt',
      });
      accepted.push(payload);
      return {
        token,
        clientId: String(payload['client_id']),
        scopes: String(payload['scope']).split(' '),
        ...(payload.exp === undefined ? {} : { expiresAt: payload.exp }),
        resource: new URL(RESOURCE),
        extra: { sub: payload.sub },
      };
    } catch {
      return undefined;
    }
  }

  server = createServer((req: IncomingMessage, res: ServerResponse) => {
    void (async () => {
      if (req.url === '/.well-known/oauth-protected-resource/mcp') {
        res.writeHead(200, { 'content-type': 'application/json' });
        res.end(
          JSON.stringify({
            resource: RESOURCE,
            authorization_servers: [ISSUER],
            scopes_supported: ['notes:read'],
            bearer_methods_supported: ['header'],
          }),
        );
        return;
      }
      const auth = await authenticate(req);
      if (!auth) {
        res.writeHead(401, {
          'www-authenticate': `Bearer resource_metadata="${PRM_URL}", scope="notes:read"`,
        });
        res.end();
        return;
      }
      const mcp = new McpServer({ name: 'notes', version: '1.0.0' });
      mcp.registerTool('whoami', { description: 'who the token names' }, (extra) => ({
        content: [
          { type: 'text', text: `${String(extra.authInfo?.extra?.['sub'])} ${extra.authInfo?.scopes.join(' ')}` },
        ],
      }));
      const transport = new StreamableHTTPServerTransport({ sessionIdGenerator: undefined });
      res.on('close', () => {
        void transport.close();
        void mcp.close();
      });
      await mcp.connect(transport);
      await transport.handleRequest(Object.assign(req, { auth }), res);
    })().catch((e: unknown) => {
      res.writeHead(500);
      res.end(String(e));
    });
  });
  await new Promise<void>((resolve) => server.listen(PORT, '127.0.0.1', resolve));
});

after(() => {
  server.close();
});

test('the machine-to-machine provider with a JWT-SVID gets a token the MCP server accepts', async () => {
  const provider = new StaticPrivateKeyJwtProvider({
    clientId: CLIENT_ID,
    jwtBearerAssertion: jwtSvid(ISSUER),
    expectedIssuer: ISSUER,
    scope: 'notes:read',
  });
  const client = new Client({ name: 'tessera-conformance', version: '1.0.0' });
  await client.connect(new StreamableHTTPClientTransport(new URL(RESOURCE), { authProvider: provider }));
  const result = await client.callTool({ name: 'whoami', arguments: {} });
  await client.close();
  const content = result.content as { type: string; text: string }[];
  assert.equal(content[0]?.text, `${CLIENT_ID} notes:read`);
  const claims = accepted.at(-1);
  assert.ok(claims);
  assert.equal(claims['client_id'], CLIENT_ID);
  assert.equal(claims['txn'], claims.jti, 'no task named: the token is its own task');
  assert.equal(provider.tokens()?.token_type, 'Bearer');
});

test('the same assertion presented again is refused with invalid_client', async () => {
  const assertion = jwtSvid(ISSUER);
  const form = () =>
    new URLSearchParams({
      grant_type: 'client_credentials',
      client_assertion_type: 'urn:ietf:params:oauth:client-assertion-type:jwt-spiffe',
      client_assertion: assertion,
      resource: RESOURCE,
      scope: 'notes:read',
    });
  const first = await fetch(`${ISSUER}/token`, { method: 'POST', body: form() });
  assert.equal(first.status, 200, await first.clone().text());
  const again = await fetch(`${ISSUER}/token`, { method: 'POST', body: form() });
  assert.equal(again.status, 401);
  assert.equal(((await again.json()) as { error: string }).error, 'invalid_client');
});
